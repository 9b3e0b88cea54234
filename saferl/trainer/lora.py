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
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        merged[name.replace(".base_layer.", ".")] = tensor
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            key = f"{name}.weight"
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            merged[key] = (merged[key].float() + delta.float()).to(merged[key].dtype)
    return merged
