"""Quiet logs: the known-harmless lines of a real `make train` (vLLM, Ray, DeepSpeed, torch, per-actor bars)
are dropped, real warnings and errors get through, and `-v` / `logging.verbose=true` turns the filter off."""

import io
import os
import subprocess
import sys
import textwrap

from saferl.quiet import LineFilter, is_harmless

# Lines from `make train` on the toy config (2026-12-01), as Ray forwards them, colours included.
NOISE = [
    "\x1b[36m(RolloutWorker pid=32487)\x1b[0m (MainProcess pid=32487) WARNING 12-01 09:15:22 [layerwise.py:266] "
    "RotaryEmbedding: Failed to load weights\x1b[32m [repeated 4x across cluster]\x1b[0m",
    "\x1b[36m(RolloutWorker pid=32488)\x1b[0m (MainProcess pid=32488) WARNING 12-01 09:14:29 [arg_utils.py:1945] The "
    "global random seed is set to 0. Since VLLM_ENABLE_V1_MULTIPROCESSING is set to False, this may affect",
    "\x1b[36m(GuardScorer pid=326)\x1b[0m (MainProcess pid=326) WARNING 12-01 09:14:43 [cpu.py:224] Triton is not "
    "installed. triton-cpu is expected on x86 CPUs.",
    "\x1b[36m(RolloutWorker pid=32487)\x1b[0m W1201 09:14:29.887000 32487 .venv/lib/python3.11/site-packages/torch/"
    "_library/triton.py:53] Triton not available, find_triton_kernels = []",
    "\x1b[36m(RolloutWorker pid=32487)\x1b[0m [W1201 09:14:30.754766237 utils.cpp:68] Warning: NUMA binding: Using "
    "MEMBIND policy for memory allocation on the NUMA nodes (0).",
    "\x1b[36m(RolloutWorker pid=32487)\x1b[0m (MainProcess pid=32487) WARNING 12-01 09:14:30 [cpu_worker.py:114] "
    "libtcmalloc is not found in LD_PRELOAD. For best performance, please follow",
    "\x1b[36m(PolicyTrainer pid=574)\x1b[0m [2026-12-01 09:16:04,764] [WARNING] [real_accelerator.py:213:"
    "get_accelerator] Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
    "\x1b[36m(HelpfulnessScorer pid=479)\x1b[0m Loading weights:   0%|          | 0/25 [00:00<?, ?it/s]Loading "
    "weights: 100%|██████████| 25/25 [00:00<00:00, 9284.36it/s]".replace("]Loading", "]\rLoading"),
    "\x1b[36m(RolloutWorker pid=32487)\x1b[0m Loading safetensors checkpoint shards: 100% Completed | 1/1",
    "\x1b[36m(PolicyTrainer pid=574)\x1b[0m Writing model shards:   0%|          | 0/1 [00:00<?, ?it/s]",
    "\x1b[36m(RolloutWorker pid=32487)\x1b[0m ",
    "2026-12-01 09:14:07,513\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this Ray "
    "cluster. Set RAY_AUTH_MODE=disabled to opt out.",
]
REAL = [
    "\x1b[36m(RolloutWorker pid=32487)\x1b[0m (MainProcess pid=32487) WARNING 12-01 09:15:22 [scheduler.py:1] "
    "Sequence group 3 is preempted: not enough KV cache space",
    "\x1b[36m(GuardScorer pid=326)\x1b[0m Traceback (most recent call last):",
    "\x1b[36m(PolicyTrainer pid=574)\x1b[0m Loading weights:   0%|  | 0/46\rRuntimeError: out of memory",
    "UserWarning: RotaryEmbedding has no such option",  # another message naming the same module
    "",  # the driver's own blank line before the final table
    "| safety rate (harmful, guard)                 |  0.379 |  0.930 | +0.551 |",
]


def test_harmless_lines_of_make_train_are_recognised_and_real_ones_are_not():
    assert [line for line in NOISE if not is_harmless(line)] == []
    assert [line for line in REAL if is_harmless(line)] == []


def test_line_filter_drops_noise_and_keeps_real_lines_and_the_drivers_bar():
    out = io.StringIO()
    f = LineFilter(out)
    for line in NOISE[:3]:
        f.write(line)  # print() writes the text, then the newline
        f.write("\n")
    f.write(REAL[0] + "\n" + NOISE[3] + "\n")
    f.write("\rsteps:  10%|#   | 1/10 reward -3.1")  # the driver's bar redraws: shown at once
    assert out.getvalue().endswith("\rsteps:  10%|#   | 1/10 reward -3.1")
    f.write("\rsteps: 100%|####| 10/10 reward 2.0\n")
    f.write("\rLoading weights:   0%|  | 0/46")  # an in-process per-model bar: dropped up to its newline
    f.write("\rLoading weights: 100%|##| 46/46\n")
    f.write(REAL[1] + "\n")
    f.flush()
    assert out.getvalue() == (REAL[0] + "\n\rsteps:  10%|#   | 1/10 reward -3.1\rsteps: 100%|####| 10/10 reward 2.0\n"
                              + REAL[1] + "\n")


SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    from saferl.cli.main import _cmd_train, build_parser
    _cmd_train(build_parser().parse_args(["train", "--dry-run", *sys.argv[1:]]))  # filters unless verbose
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # after: writes through the filter
    logging.getLogger("vllm.model_executor.layerwise").warning("RotaryEmbedding: Failed to load weights")
    print("(RolloutWorker pid=7) [W1201 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy", file=sys.stderr)
    logging.getLogger("vllm.core.scheduler").warning("Sequence group 3 is preempted")
    warnings.warn("the learning rate is NaN")
    print("(GuardScorer pid=8) ValueError: the guard crashed")
""")


def run_script(*args):
    env = dict(os.environ, PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_a_real_warning_reaches_the_user_and_verbose_shows_everything():
    quiet = run_script()
    assert "Sequence group 3 is preempted" in quiet and "the learning rate is NaN" in quiet
    assert "the guard crashed" in quiet
    assert "RotaryEmbedding" not in quiet and "NUMA" not in quiet
    for verbose in (["-v"], ["logging.verbose=true"]):
        loud = run_script(*verbose)
        assert "RotaryEmbedding: Failed to load weights" in loud and "NUMA binding" in loud
        assert "Sequence group 3 is preempted" in loud and "the learning rate is NaN" in loud


# Everything under the main guard: the spawned worker re-imports this script, and a quiet_output() at its top
# level would filter the worker whatever worker_pool passed on.
WORKER_SCRIPT = """
import sys

if __name__ == "__main__":
    from saferl.quiet import quiet_output
    if sys.argv[1] == "quiet":
        quiet_output()
    from saferl.toyworld.build import worker_pool
    with worker_pool() as pool:
        pool.apply(print, ("Writing model shards: 100%|##########| 1/1 [00:00<00:00, 99.0it/s]",), {"flush": True})
        pool.apply(print, ("worker: a real line",), {"flush": True})
"""


def test_the_toy_world_builds_worker_filters_as_its_parent(tmp_path):
    """The build's spawned worker writes to the terminal directly: quiet, it drops a saving bar and keeps a
    real line; with the parent unfiltered (-v), the worker prints both."""
    script = tmp_path / "pool.py"
    script.write_text(WORKER_SCRIPT)
    out = {mode: subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=120,
                                check=True).stdout for mode in ("quiet", "verbose")}
    assert "worker: a real line" in out["quiet"] and "Writing model shards" not in out["quiet"], out["quiet"]
    assert "worker: a real line" in out["verbose"] and "Writing model shards" in out["verbose"], out["verbose"]


def test_an_actors_saving_bar_is_dropped_while_the_drivers_bar_holds_the_line_open():
    """What the toy run printed at its step-10 checkpoint: Ray forwards the trainer's saving bar as one line
    while the driver's own bar has no newline yet; the bar was shown because the line was already 'shown'."""
    out = io.StringIO()
    f = LineFilter(out)
    f.write("\rtrain:  25%|##  | 10/40 reward -4.67")
    f.write("\x1b[36m(PolicyTrainer pid=872)\x1b[0m \rWriting model shards:   0%|   | 0/1 [00:00<?, ?it/s]"
            "\rWriting model shards: 100%|###| 1/1 [00:00<00:00, 127.03it/s]\n")
    f.write("\rtrain:  28%|##  | 11/40 reward -3.62")
    f.write("\x1b[36m(GuardScorer pid=9)\x1b[0m ValueError: the guard crashed\n")
    f.flush()
    assert out.getvalue() == ("\rtrain:  25%|##  | 10/40 reward -4.67\rtrain:  28%|##  | 11/40 reward -3.62"
                              "\x1b[36m(GuardScorer pid=9)\x1b[0m ValueError: the guard crashed\n")
