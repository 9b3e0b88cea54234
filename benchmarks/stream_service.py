"""`saferl serve stream-guard` under load on loopback, against re-feeding the whole sequence per token, in one run.

The toy world's trained Stream guard (`toyworld:stream_guard`, hidden 128, 2 layers; built by `saferl toyworld
build`, reused from the cache), or with `--model large-random` a random one of hidden 512 and 8 layers on the
toy tokenizer, is served by the real CLI in a subprocess on 127.0.0.1 (the clients run in this process, on
the same 2 CPUs). For 1, 8 and 64 concurrent streams, each opened on a held-out toy prompt, each stream
appends 512 answer tokens (held-out toy answers, safe and unsafe, concatenated) one token at a time, sending
the next as soon as the verdict of the last arrives, in three ways (`MODES`): a keep-alive HTTP connection
per stream (one `POST .../append` per token), a WebSocket per stream (`/v1/streams/{id}/live`, one frame
per token), and one connection sending every stream's next token in one request per step. The time from
sending a token to reading its verdict is the latency moderation adds to it. Reported: P50 and P99 over all
tokens, the median over the last 64 positions (449-512), tokens per second (all streams) and tokens fed per
server tick. The one-stream case runs `--one-stream-runs` streams one after another (8 x 512 tokens), so its
P99 is not the 5th slowest of 512 tokens; ratios are to the same way of driving at one stream.

Against it, in this process, on the same model and thread count:
- re-feeding (the official `stream_moderate_from_ids` approach, QwenLM/Qwen3Guard#22): for each new token, one
  forward over the stream's whole sequence so far. Timed at answer position 512 (one forward over prefix + 512
  tokens per stream; the N streams batched in one forward, which favours re-feeding over the official one at a
  time); its tokens per second at 512 is N over that time;
- the in-process `StreamBatch` the server runs on, fed the same tokens one per stream per step (no HTTP): the
  server's latency minus this is what HTTP and the service add, and its ratio N rows / 1 row (printed) is
  the ratio a server without per-request costs would show (a tick cannot cost less than its forward; a
  fixed cost per request, added to both sides, can make the server's ratio lower).

Correctness (exit 1 on failure): every token's verdict from the server (position, risk, category, and their
probabilities within 1e-4) equals the in-process `StreamBatch`'s and the re-feed's on the same tokens, and
each stream's final decision equals `debounce` (official rule) over the in-process labels. The
re-feed's verdict at position p is read from one forward over the whole sequence (causal attention: the same
logits as re-feeding up to p), and checked against the timed position-512 re-feed too.

Goals (issue #19): P99 per token at 64 streams <= 2x that at 1 stream; server >= 20x faster per token than
re-feeding at position 512.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_service.py [--streams 1 8 64] [--tokens 512]
        [--out benchmarks/results/stream_service.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from record import ROOT, recorded

TAIL = 64  # the last positions, whose median latency is compared with re-feeding at the last position
ATOL = 1e-4
START_TIMEOUT_S = 1800  # the server's start (imports, model load) took over 600 s at load 40 on 2 CPUs


class Verdict(NamedTuple):
    """One token's reading: its position in the stream's sequence, risk, risk probability, category, its prob."""

    position: int
    risk: str
    risk_prob: float
    category: str
    category_prob: float


def mismatches(got: list[list[Verdict]], want: list[list[Verdict]], what: str, atol: float = ATOL) -> list[str]:
    """Where `got` (per stream, per token) differs from `want`: missing tokens, another position, label or
    category, or a probability off by more than `atol`. Empty when they agree."""
    out = []
    if len(got) != len(want):
        return [f"{what}: {len(got)} streams, expected {len(want)}"]
    for s, (g, w) in enumerate(zip(got, want)):
        if len(g) != len(w):
            out.append(f"{what}: stream {s} has {len(g)} verdicts, expected {len(w)}")
            continue
        for i, (a, b) in enumerate(zip(g, w)):
            if (a.position, a.risk, a.category) != (b.position, b.risk, b.category):
                out.append(f"{what}: stream {s} token {i}: {a[:2]} {a.category} != {b[:2]} {b.category}")
            elif abs(a.risk_prob - b.risk_prob) > atol or abs(a.category_prob - b.category_prob) > atol:
                out.append(f"{what}: stream {s} token {i}: probabilities {a.risk_prob:.6f}/{a.category_prob:.6f}"
                           f" != {b.risk_prob:.6f}/{b.category_prob:.6f}")
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


# ------------------------------------------------------------------ the workload


class Workload(NamedTuple):
    messages: list[list[dict[str, str]]]  # per stream: the conversation it opens on
    prefixes: list[list[int]]  # per stream: its rendered prefix (what the server computes)
    answers: list[list[int]]  # per stream: the answer tokens appended


def workload(tokenizer: Any, heldout: Path, streams: int, tokens: int) -> Workload:
    """Stream s opens on a held-out row's prompt and appends the answers of held-out rows in a random order
    (seeded by s; their guard token ids, concatenated) up to `tokens` tokens."""
    from saferl.guard.conversation import encode_prompt

    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    messages, prefixes, answers = [], [], []
    for s in range(streams):
        order = random.Random(s).sample(range(len(rows)), len(rows))
        user = [m for m in rows[order[0]]["message"] if m["role"] == "user"][-1:]
        ids, k = [], 0
        while len(ids) < tokens:
            text = rows[order[k % len(rows)]]["message"][-1]["content"]
            ids += tokenizer(" " + text, add_special_tokens=False)["input_ids"]
            k += 1
        messages.append(user)
        prefixes.append(encode_prompt(tokenizer, user))
        answers.append(ids[:tokens])
    return Workload(messages, prefixes, answers)


# ------------------------------------------------------------------ the server side


class Connection:
    """One keep-alive HTTP/1.1 connection, kept minimal (a few microseconds per request) so that the client's
    own work, on the same CPUs, weighs as little as possible in what is measured."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else b""
        self.writer.write(f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(data)}\r\n\r\n".encode() + data)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        length = next(int(line.split(":", 1)[1]) for line in head.lower().split("\r\n")
                      if line.startswith("content-length:"))
        reply = json.loads(await self.reader.readexactly(length))
        if status != 200:
            raise RuntimeError(f"{method} {path}: {status} {reply}")
        return reply

    def close(self) -> None:
        self.writer.close()


async def health(port: int) -> dict:
    """GET /health on a new connection (an open one may have idled past the server's keep-alive timeout)."""
    conn = await Connection.open(port)
    try:
        return await conn.request("GET", "/health")
    finally:
        conn.close()


def parse(reply: dict) -> list[Verdict]:
    return [Verdict(v["position"], v["risk"], v["risk_prob"], v["category"], v["category_prob"])
            for v in reply["verdicts"]]


MODES = ("a client each", "a WebSocket each", "one request for all")


async def drive(port: int, work: Workload, mode: str) -> tuple[list[list[Verdict]], list[list[float]], float,
                                                                list[dict], float]:
    """Every stream opened, then its tokens appended one per request as fast as replies come, in one of `MODES`:
    each stream on its own keep-alive HTTP connection (`POST /v1/streams/{id}/append` per token); each on its
    own WebSocket (`/v1/streams/{id}/live`, one frame per token); or one connection appending every stream's
    next token in one request per step (`POST /v1/streams/append`), as a chat server decoding all its
    streams in lockstep would.

    Returns:
        (verdicts per stream per token, latency in seconds per stream per token, wall seconds of the appends,
        each stream's decision in its last reply, tokens fed per tick of the server during the appends)
    """
    from websockets.asyncio.client import connect

    conns = [await Connection.open(port) for _ in work.messages]
    opened = await asyncio.gather(*(c.request("POST", "/v1/streams", {"messages": m})
                                    for c, m in zip(conns, work.messages)))
    verdicts: list[list[Verdict]] = [[] for _ in conns]
    latency: list[list[float]] = [[] for _ in conns]
    decisions: list[dict] = [{} for _ in conns]
    sockets = [await connect(f"ws://127.0.0.1:{port}/v1/streams/{o['id']}/live", compression=None)
               for o in opened] if mode == "a WebSocket each" else []

    async def stream(s: int) -> None:
        path = f"/v1/streams/{opened[s]['id']}/append"
        for token in work.answers[s]:
            t = time.perf_counter()
            reply = await conns[s].request("POST", path, {"tokens": [token]})
            latency[s].append(time.perf_counter() - t)
            verdicts[s] += parse(reply)
            decisions[s] = reply["decision"]

    async def live(s: int) -> None:
        for token in work.answers[s]:
            t = time.perf_counter()
            await sockets[s].send(json.dumps({"tokens": [token]}))
            reply = json.loads(await sockets[s].recv())
            latency[s].append(time.perf_counter() - t)
            if "verdicts" not in reply:
                raise RuntimeError(f"stream {s}: {reply}")
            verdicts[s] += parse(reply)
            decisions[s] = reply["decision"]

    async def lockstep() -> None:
        for step in range(len(work.answers[0])):
            body = {"streams": [{"id": o["id"], "tokens": a[step : step + 1]} for o, a in zip(opened, work.answers)]}
            t = time.perf_counter()
            replies = (await conns[0].request("POST", "/v1/streams/append", body))["streams"]
            took = time.perf_counter() - t
            for s, reply in enumerate(replies):
                if "verdicts" not in reply:
                    raise RuntimeError(f"stream {s}: {reply}")
                latency[s].append(took)
                verdicts[s] += parse(reply)
                decisions[s] = reply["decision"]

    before = await health(port)
    start = time.perf_counter()
    if mode == "one request for all":
        await lockstep()
    else:
        await asyncio.gather(*((live if sockets else stream)(s) for s in range(len(conns))))
    wall = time.perf_counter() - start
    after = await health(port)
    per_tick = (after["tokens_fed"] - before["tokens_fed"]) / max(after["ticks"] - before["ticks"], 1)
    for c in conns:
        c.close()
    for ws in sockets:
        await ws.close()
    closer = await Connection.open(port)  # idle connections were closed by the server (keep-alive timeout)
    for o in opened:
        await closer.request("DELETE", f"/v1/streams/{o['id']}")
    closer.close()
    return verdicts, latency, wall, decisions, per_tick


def start_server(model: str, streams: int, log: Path) -> tuple[subprocess.Popen, int]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "saferl.cli", "serve", "stream-guard", "-m", model,
                             "--port", str(port), "--max-streams", str(streams), "--device", "cpu"], cwd=ROOT,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"the server did not answer /health within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


# ------------------------------------------------------------------ the in-process sides


def verdicts_of(steps: list[Any]) -> list[Verdict]:
    return [Verdict(v.position, v.risk, v.risk_prob, v.category, v.category_prob) for st in steps
            for v in st.verdicts if v.role == "assistant"]


def in_process(model: Any, tokenizer: Any, work: Workload) -> tuple[list[list[Verdict]], list[float]]:
    """The server's `StreamBatch`, in this process: all streams prefilled, then one token each per feed.

    Returns:
        (verdicts per stream per token, seconds of each feed)
    """
    from saferl.guard.conversation import role_tokens
    from saferl.guard.stream import StreamBatch

    batch = StreamBatch(model, role_tokens(tokenizer), pad_id=tokenizer.pad_token_id or 0)
    ids = list(batch.add(work.prefixes))
    steps: list[list[Any]] = [[] for _ in ids]
    times = []
    for t in range(len(work.answers[0])):
        start = time.perf_counter()
        out = batch.feed({sid: work.answers[s][t : t + 1] for s, sid in enumerate(ids)})
        times.append(time.perf_counter() - start)
        for s, sid in enumerate(ids):
            steps[s].append(out[sid])
    return [verdicts_of(s) for s in steps], times


def refeed(model: Any, tokenizer: Any, work: Workload, rounds: int) -> tuple[list[list[Verdict]], list[Verdict], float]:
    """Re-feeding: the readings at every position (one whole-sequence forward per stream), and the timed step
    at the last position, one forward over every stream's whole sequence (right-padded, batched).

    Returns:
        (verdicts per stream per token, each stream's verdict from the timed last-position forward, median
        seconds of that forward)
    """
    from saferl.guard.conversation import role_tokens
    from saferl.guard.stream import moderate_full, moderate_many

    roles = role_tokens(tokenizer)
    sequences = [p + a for p, a in zip(work.prefixes, work.answers)]
    every = [verdicts_of([moderate_full(model, seq, roles)])[-len(a):] for seq, a in zip(sequences, work.answers)]
    times, last = [], []
    for _ in range(rounds + 1):  # the first is a warm-up
        start = time.perf_counter()
        steps = moderate_many(model, sequences, roles, batch_size=len(sequences), pad_id=tokenizer.pad_token_id or 0)
        times.append(time.perf_counter() - start)
        last = [verdicts_of([st])[-1] for st in steps]
    return every, last, statistics.median(times[1:])


# ------------------------------------------------------------------ main


def server_side(got: list[list[Verdict]], latency: list[list[float]], wall: float, tokens: int) -> dict[str, float]:
    flat = [x for lat in latency for x in lat]
    tail = [x for lat in latency for x in lat[-TAIL:]]
    return {"p50": percentile(flat, 50), "p99": percentile(flat, 99), "tail": statistics.median(tail),
            "tok_s": len(latency) * tokens / wall, "labels": len({v.risk for g in got for v in g})}


def part(work: Workload, start: int, n: int) -> Workload:
    return Workload(*(field[start : start + n] for field in work))


def measure(n: int, port: int, model: Any, tokenizer: Any, heldout: Path, tokens: int, rounds: int,
            runs: int, modes: list[str]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """One row per way of driving the server (`MODES`), each with the in-process and re-feed figures for the
    same streams. The n streams run `runs` times one after another, each time on other answers (more
    samples for a steady P99: the one-stream baseline's 512 tokens alone would put its P99 at the 5th
    slowest token)."""
    from saferl.guard.decisions import debounce

    parts = [part(workload(tokenizer, heldout, n * runs, tokens), k * n, n) for k in range(runs)]
    local, feeds, every, last, refeed_times, want = [], [], [], [], [], []
    for work in parts:
        verdicts, times = in_process(model, tokenizer, work)
        e, l, r = refeed(model, tokenizer, work, rounds)
        local.append(verdicts), feeds.append(times), every.append(e), last.append(l), refeed_times.append(r)
        want.append([(d.index, d.label.value, d.category) for d in
                     (debounce([v.risk for v in g], "official", [v.category for v in g]) for g in verdicts)])
    flat_feeds = [t for times in feeds for t in times]
    refeed_s = statistics.median(refeed_times)
    sides = {"local": statistics.median(flat_feeds), "local_tail": statistics.median(
        [t for times in feeds for t in times[-TAIL:]]), "local_tok_s": n / statistics.median(flat_feeds),
        "refeed": refeed_s, "refeed_tok_s": n / refeed_s, "runs": runs}
    rows, failed = {}, []
    for mode in modes:
        name = f"{n}, {mode}"
        got_all, latency_all, wall_all, per_tick = [], [], 0.0, []
        for k, work in enumerate(parts):
            got, latency, wall, decisions, rows_per_tick = asyncio.run(drive(port, work, mode))
            per_tick.append(rows_per_tick)
            failed += mismatches(got, local[k], f"{name}: server vs in-process StreamBatch")
            failed += [f"{name}: stream {s} decision {d} != {w}" for s, (d, w) in enumerate(zip(decisions, want[k]))
                       if (d["position"], d["label"], d["category"]) != w]
            failed += mismatches(got, every[k], f"{name}: server vs re-feed")
            failed += mismatches([[g[-1]] for g in got], [[v] for v in last[k]],
                                 f"{name}: server vs timed re-feed @{tokens}")
            got_all += got
            latency_all += latency
            wall_all += wall
        rows[name] = {**server_side(got_all, latency_all, wall_all, tokens), **sides,
                      "rows_per_tick": statistics.mean(per_tick)}
        print(f"measured {name}: P50 {rows[name]['p50'] * 1e3:.2f} ms, P99 {rows[name]['p99'] * 1e3:.2f} ms, "
              f"in-process step {sides['local'] * 1e3:.2f} ms; {len(failed)} mismatches so far", file=sys.stderr,
              flush=True)
    return rows, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--tokens", type=int, default=512, help="answer tokens per stream")
    parser.add_argument("--rounds", type=int, default=3, help="timed re-feed forwards per stream count")
    parser.add_argument("--one-stream-runs", type=int, default=8,
                        help="the one-stream case runs this many streams one after another (more samples)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="ways of driving the server")
    parser.add_argument("--model", choices=("toy", "large-random"), default="toy",
                        help="toy: the trained toy Stream guard; large-random: a random one of hidden 512, 8 "
                        "layers (benchmarks/stream_guard.py's large model) on the toy tokenizer, where compute "
                        "outweighs the per-call overhead")
    parser.add_argument("--out", help="also write the output, command and date to this Markdown file")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from saferl.guard.stream_model import load_stream_guard
    from saferl.references import resolve_reference

    torch.set_num_threads(1)
    path, heldout = resolve_reference("toyworld:stream_guard"), Path(resolve_reference("toyworld:stream_heldout"))
    tmp = Path(tempfile.mkdtemp(prefix="stream-service-"))
    if args.model == "large-random":
        from saferl.guard.stream_model import write_synthetic_stream_guard

        path = str(write_synthetic_stream_guard(tmp / "guard", path, seed=0, hidden_size=512, num_hidden_layers=8,
                                                num_attention_heads=8, num_key_value_heads=4, guard_inner_size=256))
    model, tokenizer = load_stream_guard(path), AutoTokenizer.from_pretrained(path)
    proc, port = start_server(path, max(*args.streams, 2), tmp / "server.log")
    results, failed = {}, []
    with recorded(args.out):  # the load average recorded at the start is the measurement's
        try:
            for mode in args.modes:  # warm-up
                asyncio.run(drive(port, workload(tokenizer, heldout, 2, 32), mode))
            for n in args.streams:
                rows, f = measure(n, port, model, tokenizer, heldout, args.tokens, args.rounds,
                                  args.one_stream_runs if n == 1 else 1, args.modes)
                results.update(rows)
                failed += f
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        report(results, args.tokens, path)
        for line in failed[:20]:
            print("FAILED", line)
        print(f"correctness: {'FAILED, ' + str(len(failed)) + ' mismatches' if failed else 'ok'} (server verdicts "
              f"= in-process StreamBatch = re-feed, probabilities within {ATOL:g}; decisions = debounce)")
    return 1 if failed else 0


def report(results: dict[str, dict[str, float]], tokens: int, path: str) -> None:
    import torch

    cfg = json.loads((Path(path) / "config.json").read_text())
    name = "toy Stream guard" if "toyworld" in path else "random Stream guard"
    tail = f"@{tokens - TAIL + 1}-{tokens}"
    print(f"{name} (h{cfg['hidden_size']}, {cfg['num_hidden_layers']} layers) at {path}; torch "
          f"{torch.__version__}, 1 thread, float32; {tokens} answer tokens per stream, one per stream per "
          "request or frame; ms per token")
    head = ["streams, clients", "runs", "server P50", "P99", f"median {tail}", "tok/s", "rows/tick",
            "in-process step", f"median {tail}", "tok/s", f"re-feed @{tokens}", "tok/s", f"speedup @{tokens}",
            "labels seen"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in results.items():
        cells = [name, str(r["runs"]), f"{r['p50'] * 1e3:.2f}", f"{r['p99'] * 1e3:.2f}", f"{r['tail'] * 1e3:.2f}",
                 f"{r['tok_s']:.0f}", f"{r['rows_per_tick']:.1f}", f"{r['local'] * 1e3:.2f}",
                 f"{r['local_tail'] * 1e3:.2f}", f"{r['local_tok_s']:.0f}", f"{r['refeed'] * 1e3:.1f}",
                 f"{r['refeed_tok_s']:.0f}", f"{r['refeed'] / r['tail']:.1f}x", str(r["labels"])]
        print("| " + " | ".join(cells) + " |")
    for mode in MODES:
        one = results.get(f"1, {mode}")
        for name, r in results.items():
            if one is not None and name.endswith(mode) and r is not one:
                print(f"{name} / 1 stream: P99 {r['p99'] / one['p99']:.2f}x (goal at 64: <= 2x), P50 "
                      f"{r['p50'] / one['p50']:.2f}x, median {tail} {r['tail'] / one['tail']:.2f}x")
    first = next(iter(results), "1, ").split(", ", 1)[1]  # the in-process figures are the same in every mode
    one = results.get(f"1, {first}")
    for name, r in results.items():
        if one is not None and name.endswith(first) and r is not one:
            print(f"in-process StreamBatch step, {name.split(',')[0]} rows / 1 row (no HTTP: the ratio without "
                  f"per-request costs): median {r['local'] / one['local']:.2f}x, {tail} "
                  f"{r['local_tail'] / one['local_tail']:.2f}x")
    print(f"speedup = re-feed forward at {tokens} (all streams batched) / server median latency at positions "
          f"{tokens - TAIL + 1}-{tokens} (goal >= 20x); re-feed @{tokens} / in-process step {tail} (no HTTP): "
          + ", ".join(f"{name.split(',')[0]} streams {r['refeed'] / r['local_tail']:.1f}x"
                      for name, r in results.items() if name.endswith(first)))


if __name__ == "__main__":
    sys.exit(main())
