"""Process set-up shared by the driver and every actor: thread counts, offline hub, vLLM on CPU.

On 2 shared cores more than one torch thread per process was measured up to 10x slower, and single-process
vLLM collapsed without OMP_NUM_THREADS=1, so every process SafeRL starts gets these settings before torch or
vLLM are imported. `CPU_ENV` is also handed to Ray as the actors' runtime environment.
"""

from __future__ import annotations

import os

CPU_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    # vLLM: one process per engine (2 s start instead of 12 s, tensors pass straight through RPC) and no
    # inductor compile of the sampler on first generate (10-14 s cold, needs gcc).
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",
    # Keep Ray's listeners on loopback (must be set before `import ray`).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DEDUP_LOGS": "1",
    # Quieter actors: vLLM's per-engine INFO banner and torch/vLLM deprecation notices drown the progress bar.
    "VLLM_LOGGING_LEVEL": "WARNING",
    "PYTHONWARNINGS": "ignore::FutureWarning",
}


def configure_process(threads: int = 1) -> None:
    """Apply CPU_ENV defaults (explicit user settings win) and pin torch to `threads` threads."""
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(threads)


def check_model_dir(path: str) -> None:
    """Fail fast and clearly when a local model path has no config.json; hub ids (`org/name`) pass through."""
    from pathlib import Path

    p = Path(path)
    looks_local = p.is_absolute() or path.startswith(".") or p.exists() or path.count("/") != 1
    if looks_local and not (p / "config.json").is_file():
        raise FileNotFoundError(f"Model directory not found or has no config.json: {path}")
