"""LoRA for the policy through peft: wrap the model, and produce merged weights without touching the adapter.

Owns the two things peft does not do the way RL needs:
- `merged_state_dict` returns W + scale * B @ A for every adapted layer under the base model's own HF names,
  computed on the side. peft's `merge_adapter()` / `unmerge_adapter()` would add and subtract the delta in
  place, and in floating point W + D - D != W, so the frozen base weights would drift a little at every
  weight sync.
- The reference policy for the KL term is the base model with the adapter switched off (no second copy).
"""

from __future__ import annotations

import torch


def apply_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float,
               target_modules: list[str]) -> torch.nn.Module:
    """Wrap a causal LM with LoRA adapters; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full weights with the adapters folded in, keyed like the base model's own `state_dict()`.

    For a plain (non-peft) model this is its state dict.
    """
    if not is_lora(model):
        return dict(model.state_dict())
    names = [k.replace(".base_layer.", ".") for k in model.get_base_model().state_dict() if "lora_" not in k]
    return dict(merged_tensors(model, names))


def export_parameters(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """{HF name of an exported weight: the parameters it is computed from}, in the model's order. A tied
    weight appears under each of its names; an adapted weight needs its base weight and its adapters."""
    base = model.get_base_model() if is_lora(model) else model
    out: dict[str, list[torch.nn.Parameter]] = {}
    for name, param in base.named_parameters(remove_duplicate=False):
        key = name.split(".lora_")[0] + ".weight" if "lora_" in name else name.replace(".base_layer.", ".")
        out.setdefault(key, []).append(param)
    return out


def merged_tensors(model: torch.nn.Module, names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) for the HF `names`, adapters folded in (W + scale * B @ A, computed on the side); the
    others are the model's own tensors, not copies."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if is_lora(model) else model
    out = []
    for name in names:
        path, _, leaf = name.rpartition(".")
        module = base.get_submodule(path)
        if isinstance(module, LoraLayer):
            tensor = getattr(module.get_base_layer(), leaf)
            if leaf == "weight" and module.active_adapters:
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                tensor = (tensor.float() + delta.float()).to(tensor.dtype)
        else:
            tensor = getattr(module, leaf)
        out.append((name, tensor))
    return out
