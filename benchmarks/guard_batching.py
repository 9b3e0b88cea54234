"""Guard-scoring throughput over HTTP: dynamic batching against one request at a time, in one run.

Starts `saferl serve guard` twice on loopback with the same model and engine: once with dynamic batching
(`--max-batch 64`), once with batches of one (`--max-batch 1`, every request its own model call, as a
naive reward server does). A client then sends the same N one-item moderation requests from C concurrent
threads to each and prints requests/s and the ratio. Defaults: the toy guard on vLLM, N=256, C=64.

Model calls are measured on both sides, never assumed: over HTTP as the change in the server's count of
batches run (GET /health; each batch is one `GuardScorer.moderate`, one engine call), in-process by counting
the guard engine's `generate` calls and the items they carried.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guard_batching.py [--requests 256] [--concurrency 64]
        [--out benchmarks/results/guard_batching.md]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from record import recorded

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, backend: str, max_batch: int, max_wait_ms: float, log: Path
                 ) -> tuple[str, subprocess.Popen]:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "saferl.cli", "serve", "guard", "-m", model, "--backend", backend,
                             "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)],
                            cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            time.sleep(0.5)
    raise TimeoutError(f"server not up; see {log}")


def requests_for(n: int) -> list[dict]:
    """n one-item bodies over the toy world's held-out prompts and their response styles."""
    from saferl.config import SafeRLConfig
    from saferl.data import load_prompts
    from saferl.toyworld import world
    from saferl.toyworld.build import ensure_built

    prompts = load_prompts(ensure_built(SafeRLConfig().toyworld).part("heldout"))
    bodies = []
    for i in range(n):
        prompt = prompts[(i * 37) % len(prompts)]
        styles = sorted(world.responses_for(prompt).items())
        response = styles[i % len(styles)][1][0]
        bodies.append({"items": [{"messages": prompt.messages, "response": response}]})
    return bodies


def run_load(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list]:
    """Send every body with at most `concurrency` in flight (one asyncio client, no thread per request)."""
    import asyncio

    import httpx

    async def go() -> tuple[float, list]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(body: dict) -> dict:
                async with gate:
                    response = await client.post(url + "/v1/moderate", json=body)
                    response.raise_for_status()
                    return response.json()["verdicts"][0]

            await one(bodies[0])  # warm-up
            start = time.monotonic()
            verdicts = await asyncio.gather(*(one(b) for b in bodies))
            return time.monotonic() - start, list(verdicts)

    return asyncio.run(go())


class CountingEngine:
    """Wraps an engine and counts its `generate` calls and the prompts they carried."""

    def __init__(self, engine: object) -> None:
        self.engine, self.calls, self.items = engine, 0, 0

    def generate(self, prompts: list, *args: object, **kwargs: object) -> list:
        self.calls += 1
        self.items += len(prompts)
        return self.engine.generate(prompts, *args, **kwargs)

    def reset(self) -> None:
        self.calls = self.items = 0


def in_process(model: str, backend: str, bodies: list[dict], concurrency: int, max_wait_ms: float
               ) -> dict[str, tuple[float, list, float, float]]:
    """The same load without HTTP: threads calling a DynamicBatcher around one GuardScorer, against the same
    scorer called one request at a time (a lock around it)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from saferl.guard.scorer import GuardScorer, ModerationItem
    from saferl.serving.batcher import DynamicBatcher

    scorer = GuardScorer(model, backend=backend)
    engine = scorer.engine = CountingEngine(scorer.engine)
    items = [ModerationItem(b["items"][0]["messages"], b["items"][0]["response"]) for b in bodies]
    scorer.moderate(items[:1])  # warm-up
    lock = threading.Lock()

    def single(item: ModerationItem) -> object:
        with lock:
            return scorer.moderate([item])[0]

    out = {}
    for name, max_batch in (("dynamic batching (max 64)", 64), ("one request at a time", 1)):
        batcher = DynamicBatcher(scorer.moderate, max_batch=max_batch, max_wait_s=max_wait_ms / 1000)
        call = (lambda it: batcher([it])[0]) if max_batch > 1 else single
        engine.reset()
        start = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            verdicts = list(pool.map(call, items))
        seconds = time.monotonic() - start
        out[name] = (seconds, verdicts, engine.calls, engine.items)
        batcher.close()
    return out


def report(title: str, results: dict[str, tuple[float, list, float, float]], n: int) -> None:
    """Each side's time, throughput and measured model calls (with the items they carried)."""
    (fast_s, fast_v, *_), (slow_s, slow_v, *_) = results.values()
    print(f"\n{title}")
    print(f"{'':28s} {'seconds':>8s} {'req/s':>8s} {'model calls':>12s} {'items':>6s} {'items/call':>11s}")
    for name, (seconds, _, calls, items) in results.items():
        print(f"{name:28s} {seconds:8.2f} {n / seconds:8.1f} {calls:12.0f} {items:6.0f} "
              f"{items / max(calls, 1):11.1f}")
    print(f"throughput ratio (batched / one at a time): {slow_s / fast_s:.1f}x (goal >= 8x); "
          f"identical verdicts: {fast_v == slow_v}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="guard model dir (default: the toy guard, built if missing)")
    parser.add_argument("--backend", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=50.0, help="the batching server's wait for company")
    parser.add_argument("--no-http", action="store_true",
                        help="only the in-process comparison (for a machine without the server stack, e.g. a GPU box "
                             "with torch and transformers only: use it with --backend hf)")
    parser.add_argument("--out", help="also write the output, command and date to this Markdown file")
    args = parser.parse_args()
    from saferl.config import SafeRLConfig
    from saferl.toyworld.build import ensure_built

    model = args.model or str(ensure_built(SafeRLConfig().toyworld).part("guard"))
    bodies = requests_for(args.requests)
    logs = ROOT / ".cache" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    results = {}
    server_settings = () if args.no_http else (("dynamic batching (max 64)", 64), ("one request at a time", 1))
    for name, max_batch in server_settings:
        url, proc = start_server(model, args.backend, max_batch, args.max_wait_ms,
                                 logs / f"guard_batch{max_batch}.log")
        try:
            import httpx

            before = httpx.get(url + "/health").json()
            seconds, verdicts = run_load(url, bodies, args.concurrency)
            after = httpx.get(url + "/health").json()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        # Counted by the server around the whole load, so its one warm-up request is in the counts.
        results[name] = (seconds, verdicts, after["batches"] - before["batches"],
                         after["items"] - before["items"])
    local = in_process(model, args.backend, bodies, args.concurrency, args.max_wait_ms)
    with recorded(args.out):
        if results:
            report(f"guard scoring over HTTP: {args.requests} one-item requests, {args.concurrency} concurrent, "
                   f"{args.backend} backend, {Path(model).name}", results, args.requests)
        report("the same load in-process (no HTTP): threads -> DynamicBatcher -> GuardScorer", local,
               args.requests)

if __name__ == "__main__":
    main()
