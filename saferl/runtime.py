"""Process set-up shared by the driver and every actor: torch threads, vLLM on CPU, the actors' environment.

On 2 shared cores more than one torch thread per process was measured up to 10x slower, and single-process
vLLM collapsed without OMP_NUM_THREADS=1, so on a machine without a GPU every process SafeRL starts is pinned
to one thread and runs vLLM in-process; with a GPU, torch keeps its own thread count (tokenizers and data
work want the cores) unless `run.torch_threads` says otherwise. `actor_env` is what Ray hands every actor.

The library never switches the model hub off: a GPU cluster must be able to download `Qwen/Qwen3-4B`.
Offline is the caller's choice (the Makefile and the test suite export HF_HUB_OFFLINE and friends); when the
driver has them, `actor_env` passes them on to actors on other nodes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Every process: Ray's listeners on loopback (must be set before `import ray`), quieter actors (vLLM's
# per-engine INFO banner and torch/vLLM deprecation notices drown the progress bar).
COMMON_ENV: dict[str, str] = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DEDUP_LOGS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "PYTHONWARNINGS": "ignore::FutureWarning",
}
# No GPU: vLLM in one process per engine (2 s start instead of 12 s, tensors pass straight through RPC) and no
# inductor compile of the sampler on first generate (10-14 s cold, needs gcc).
CPU_ONLY_ENV: dict[str, str] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",
}
# The hub's offline switches: passed on to actors when the driver has them, never set by the library.
OFFLINE_KEYS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def thread_count(setting: int, gpu: bool, omp_env: str | None) -> int | None:
    """Torch threads for one process; None leaves torch's own default.

    `setting` is `run.torch_threads`: N > 0 is N threads; 0 follows OMP_NUM_THREADS when it is set (`omp_env`),
    else 1 on a machine without a GPU and torch's default with one.
    """
    if setting < 0:
        raise ValueError(f"run.torch_threads must be >= 0 (0 = automatic), got {setting}")
    if setting > 0:
        return setting
    if omp_env:
        return int(omp_env)
    return None if gpu else 1


def thread_env(threads: int | None) -> dict[str, str]:
    """OMP/MKL thread variables for `threads` (none for torch's default); tokenizers stay single-threaded
    alongside a pinned torch."""
    if threads is None:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def actor_env(torch_threads: int, gpu: bool, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment variables Ray hands every actor (`gpu`: whether the actors' nodes have GPUs).

    Threads: `run.torch_threads` N > 0 pins every actor to N. With 0, actors without a GPU (a local Ray on
    this machine) follow the driver's OMP_NUM_THREADS, else 1; GPU actors are left to their node's own
    environment (a driver on a CPU-only head node must not pin GPU workers to its one thread). The CPU-only
    vLLM settings go only where there is no GPU. The hub's offline switches are passed on exactly as the
    driver's `environ` has them, and are absent if it has none.
    """
    threads = thread_count(torch_threads, gpu, None if gpu else environ.get("OMP_NUM_THREADS"))
    return {**COMMON_ENV, **(CPU_ONLY_ENV if not gpu else {}), **thread_env(threads),
            **{k: environ[k] for k in OFFLINE_KEYS if k in environ}}


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_process(torch_threads: int = 0) -> None:
    """Set this process up before torch or vLLM do work. `torch_threads` is `run.torch_threads` (see
    `thread_count`); variables the user set win, except the thread variables under an explicit N > 0."""
    import torch

    gpu = has_gpu()
    threads = thread_count(torch_threads, gpu, os.environ.get("OMP_NUM_THREADS"))
    for key, value in {**COMMON_ENV, **(CPU_ONLY_ENV if not gpu else {})}.items():
        os.environ.setdefault(key, value)
    for key, value in thread_env(threads).items():
        if torch_threads > 0:
            os.environ[key] = value  # children (toy-world workers, in-process roles, local Ray) follow it
        else:
            os.environ.setdefault(key, value)
    if threads is not None:
        torch.set_num_threads(threads)


def check_model_dir(path: str) -> None:
    """Fail fast and clearly when a local model path has no config.json; hub ids (`org/name`) pass through."""
    from pathlib import Path

    p = Path(path)
    looks_local = p.is_absolute() or path.startswith(".") or p.exists() or path.count("/") != 1
    if looks_local and not (p / "config.json").is_file():
        raise FileNotFoundError(f"Model directory not found or has no config.json: {path}")
