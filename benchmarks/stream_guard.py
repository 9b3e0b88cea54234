"""Stream-guard moderation cost on CPU: incremental KV-cached feeding vs re-feeding, and batching, in one run.

For two Qwen3Guard-Stream models, on one thread, measured side by side with warm-up and medians: the toy
world's trained Stream guard (hidden 128, 2 layers; `saferl toyworld build` makes it, else a random model of
the synthetic toy size, hidden 64, 2 layers, stands in) and a larger random one (hidden 512, 8 layers,
8 heads / 4 KV heads). Prefixes are random regular token ids inside a closed user turn:

(a) per-token cost of `StreamBatch.feed` (one stream, one token) after a 1024-token prefix vs a 64-token one
    (goal: ratio <= 1.2); the same for a plain transformers `DynamicCache` loop, for comparison;
(b) that incremental step at 1024 (mean of 8 in a row) against re-feeding the whole 1024-token sequence for
    one more token, as the shipped remote code's generator does (goal: speedup >= 20);
(c) 32 concurrent streams (64-token prefixes) fed one token each per step in one batched forward, against
    the same 32 streams each in its own StreamBatch, fed one after another (goal: throughput ratio >= 8).

The sides of each comparison are called in turn, round after round, so that load from other processes on
the machine hits both alike.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_guard.py [--steps 32] [--streams 32]
        [--out benchmarks/results/stream_guard.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from record import recorded

from saferl.guard.conversation import RoleTokens
from saferl.guard.stream import StreamBatch
from saferl.guard.stream_model import Qwen3StreamGuard, stream_guard_config

VOCAB = 1050
ROLES = RoleTokens(im_start=VOCAB - 3, im_end=VOCAB - 2, user=VOCAB - 4)
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "guard_inner_size": 32}
LARGE = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "guard_inner_size": 256,
}


class Guard(NamedTuple):
    """A model to measure, its turn-marker ids, and how many regular (non-special) ids prefixes draw from."""

    model: Qwen3StreamGuard
    roles: RoleTokens
    body_vocab: int


def build(sizes: dict) -> Qwen3StreamGuard:
    torch.manual_seed(0)
    return Qwen3StreamGuard(
        stream_guard_config(vocab_size=VOCAB, max_position_embeddings=2048, **sizes)
    ).eval()


def toy_guard() -> Guard | None:
    """The trained toy Stream guard of the default toy world, when its cache has one."""
    from transformers import AutoTokenizer

    from saferl.config import ToyWorldConfig
    from saferl.guard.conversation import role_tokens
    from saferl.guard.stream_model import load_stream_guard
    from saferl.toyworld.stream import toy_stream_paths
    from saferl.toyworld.build import toyworld_paths

    path = toy_stream_paths(toyworld_paths(ToyWorldConfig()).root).guard
    if not (path / "build.json").is_file():
        return None
    tokenizer = AutoTokenizer.from_pretrained(path)
    # `vocab_size` leaves out the added tokens: random prefixes never hold a turn marker.
    return Guard(load_stream_guard(path), role_tokens(tokenizer), tokenizer.vocab_size)


def guards() -> dict[str, Guard]:
    toy = toy_guard()
    if toy is not None:
        size = toy.model.config
        first = {f"toy trained (h{size.hidden_size}, {size.num_hidden_layers} layers)": toy}
    else:
        first = {"tiny random (h64, 2 layers; no toy guard built)": Guard(build(TINY), ROLES, VOCAB - 4)}
    return {**first, "large random (h512, 8 layers)": Guard(build(LARGE), ROLES, VOCAB - 4)}


def prefix(guard: Guard, length: int, seed: int) -> list[int]:
    """A random conversation prefix that ends with a closed user turn."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(0, guard.body_vocab, (length - 3,), generator=g).tolist()
    return [guard.roles.im_start, guard.roles.user, *body, guard.roles.im_end]


def one_stream(guard: Guard, prefix_len: int) -> Callable[[], None]:
    """A stream prefilled with `prefix_len` tokens; each call feeds it one more token."""
    batch = StreamBatch(guard.model, guard.roles)
    batch.prefill([prefix(guard, prefix_len, 0)])
    return lambda: batch.feed({0: [7]})


def one_dynamic_cache(guard: Guard, prefix_len: int) -> Callable[[], None]:
    """The same on a plain transformers `DynamicCache` (grows by concatenation), for comparison."""
    with torch.inference_mode():
        cache = guard.model(torch.tensor([prefix(guard, prefix_len, 0)]), use_cache=True).past_key_values
    token = torch.tensor([[7]])
    return torch.inference_mode()(lambda: guard.model(token, past_key_values=cache, use_cache=True))


def refeed(guard: Guard, length: int) -> Callable[[], None]:
    """One full forward over `length` tokens: what the re-feeding generator pays per token."""
    ids = torch.tensor([prefix(guard, length, 0)])
    return torch.inference_mode()(lambda: guard.model(ids))


def streams_batched(guard: Guard, streams: int) -> Callable[[], None]:
    """`streams` streams (64-token prefixes) in one StreamBatch; each call feeds one token to each."""
    batch = StreamBatch(guard.model, guard.roles)
    batch.prefill([prefix(guard, 64, s) for s in range(streams)])
    return lambda: batch.feed({s: [7] for s in range(streams)})


def streams_serial(guard: Guard, streams: int) -> Callable[[], None]:
    """The same streams each in its own StreamBatch; each call feeds one token to each, one after another."""
    batches = [StreamBatch(guard.model, guard.roles) for _ in range(streams)]
    for s, batch in enumerate(batches):
        batch.prefill([prefix(guard, 64, s)])

    def step() -> None:
        for batch in batches:
            batch.feed({0: [7]})

    return step


def interleaved(calls: dict[str, Callable[[], None]], rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn every round so that drift in the
    machine's load (other processes) hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + rounds):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(guard: Guard, steps: int, streams: int) -> dict[str, float]:
    a = interleaved(
        {
            "t64": one_stream(guard, 64),
            "t1024": one_stream(guard, 1024),
            "d64": one_dynamic_cache(guard, 64),
            "d1024": one_dynamic_cache(guard, 1024),
        },
        steps,
    )
    step = one_stream(guard, 1024)

    def eight_steps() -> None:
        for _ in range(8):
            step()

    b = interleaved({"refeed": refeed(guard, 1024), "step": eight_steps}, rounds=5, warmup=1)
    b["step"] /= 8
    c = interleaved({"batched": streams_batched(guard, streams), "serial": streams_serial(guard, streams)}, 8)
    return {**a, **b, "batched": streams / c["batched"], "serial": streams / c["serial"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=32, help="timed rounds of one-token steps for (a)")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--out", help="also write the output, command and date to this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {name: measure(guard, args.steps, args.streams) for name, guard in guards().items()}
    with recorded(args.out):
        report(results, args.streams)


def report(results: dict[str, dict[str, float]], streams: int) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, float32; medians, ms per token")
    head = ["model", "@64", "@1024", "(a) 1024/64", "DynamicCache @64", "@1024", "1024/64", "refeed @1024",
            "step @1024", "(b) speedup", f"{streams} batched tok/s", "serial tok/s",
            "(c) ratio"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in results.items():
        cells = [name, f"{r['t64'] * 1e3:.2f}", f"{r['t1024'] * 1e3:.2f}", f"{r['t1024'] / r['t64']:.2f}x",
                 f"{r['d64'] * 1e3:.2f}", f"{r['d1024'] * 1e3:.2f}", f"{r['d1024'] / r['d64']:.2f}x",
                 f"{r['refeed'] * 1e3:.1f}", f"{r['step'] * 1e3:.2f}", f"{r['refeed'] / r['step']:.0f}x",
                 f"{r['batched']:.0f}", f"{r['serial']:.0f}",
                 f"{r['batched'] / r['serial']:.1f}x"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print("goals: (a) <= 1.2x, (b) >= 20x, (c) >= 8x")


if __name__ == "__main__":
    main()
