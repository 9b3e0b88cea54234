"""Qwen3Guard-Stream checkpoints without `trust_remote_code`: model, strict loading, saving, synthetic maker.

Owns `Qwen3StreamGuard` (transformers' `Qwen3Model` backbone under `model.` plus the two head paths of
spec/qwen3guard.md §3.3 at top level), `load_stream_guard` / `save_stream_guard` in the released layout
(`config.json` + safetensors, `architectures: ["Qwen3ForGuardModel"]`), and `write_synthetic_stream_guard`,
a seeded random checkpoint with the real key names and config layout at toy sizes (tests, benchmarks).

Shortcuts and choices:
- The head layout and config keys are reconstructed (spec §3.1, §3.3), not read from the remote code.
- Loading builds the module on the meta device and assigns the checkpoint tensors: nothing is randomly
  initialised first, so an 8B guard loads without a throw-away init.
- Attention is transformers' `sdpa` through the documented `AttentionInterface`, with one CPU change
  (`sdpa_shared_kv`). Incremental moderation lives in `saferl.guard.stream`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    AutoTokenizer,
    Cache,
    Qwen3Config,
    Qwen3Model,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding

from saferl.guard.templates import CATEGORIES, RESPONSE_CATEGORIES
from saferl.types import SafetyLabel

ARCHITECTURE = "Qwen3ForGuardModel"
AUTO_MAP = {
    "AutoConfig": "configuration_qwen3.Qwen3Config",
    "AutoModel": "modeling_qwen3_guard.Qwen3ForGuardModel",
}
# The released checkpoints may or may not ship an (unused, tied) LM head: the only extra key loading accepts.
TOLERATED_EXTRA_KEYS = frozenset({"lm_head.weight"})
LABEL_MAP_KEYS = (
    "response_risk_level_map",
    "response_category_map",
    "query_risk_level_map",
    "query_category_map",
)
GUARD_CONFIG_KEYS = (
    "guard_inner_size",
    "num_risk_level",
    "num_category",
    "num_query_risk_level",
    "num_query_category",
    *LABEL_MAP_KEYS,
)
RISK_LABELS: tuple[str, ...] = tuple(
    label.value for label in SafetyLabel
)  # index order: Safe, Unsafe, Controversial


@dataclass
class GuardLogits:
    """The four head outputs at every position (logits, not probabilities), plus the backbone's KV cache.

    Shapes: `risk_level` [B, T, num_risk_level], `category` [B, T, num_category], `query_risk_level`
    [B, T, num_query_risk_level], `query_category` [B, T, num_query_category].
    """

    risk_level: torch.Tensor
    category: torch.Tensor
    query_risk_level: torch.Tensor
    query_category: torch.Tensor
    past_key_values: Cache | None = None


def _int_keyed(label_map: dict) -> dict[int, str]:
    return {int(k): str(v) for k, v in label_map.items()}


ATTENTION = "sdpa_shared_kv"


def sdpa_shared_kv(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa` attention, except that on CPU with a mask the K/V head groups are shared in SDPA.

    transformers' CPU path repeats K/V once per query head whenever a mask is given (always, with padded
    batches or a `StaticCache`): a fresh copy of the whole cache in every layer at every step, ~65% of a
    32-stream step. CPU SDPA accepts `enable_gqa` with a mask and gives the same numbers. Elsewhere (CUDA,
    where masked GQA would fall back to the math kernel) this is transformers' own function.
    """
    if query.device.type != "cpu" or attention_mask is None or key.shape[1] == query.shape[1]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


class Qwen3StreamGuard(nn.Module):
    """Qwen3Guard-Stream: a Qwen3 backbone whose last hidden state feeds a response path and a query path.

    Each path is x = RMSNorm(W_pre h); risk = W_risk x; category = W_cat x (paper Eq. 3). Heads act per
    position, so all four logits exist at every token; `saferl.guard.stream` picks where to read them.

    Args:
        config: a `Qwen3Config` that also carries `guard_inner_size`, `num_risk_level`, `num_category`,
            `num_query_risk_level`, `num_query_category` and the four label maps (string or int keys).
    """

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        hidden, inner, eps = config.hidden_size, config.guard_inner_size, config.rms_norm_eps
        self.model = Qwen3Model(config)
        # transformers' documented extension point; idempotent, so registering per instance is harmless.
        AttentionInterface.register(ATTENTION, sdpa_shared_kv)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        self.model.set_attn_implementation(ATTENTION)
        self.risk_level_category_pre = nn.Linear(hidden, inner, bias=False)
        self.risk_level_category_layernorm = Qwen3RMSNorm(inner, eps=eps)
        self.risk_level_head = nn.Linear(inner, config.num_risk_level, bias=False)
        self.category_head = nn.Linear(inner, config.num_category, bias=False)
        self.query_risk_level_category_pre = nn.Linear(hidden, inner, bias=False)
        self.query_risk_level_category_layernorm = Qwen3RMSNorm(inner, eps=eps)
        self.query_risk_level_head = nn.Linear(inner, config.num_query_risk_level, bias=False)
        self.query_category_head = nn.Linear(inner, config.num_query_category, bias=False)
        self.response_risk_level_map = _int_keyed(config.response_risk_level_map)
        self.response_category_map = _int_keyed(config.response_category_map)
        self.query_risk_level_map = _int_keyed(config.query_risk_level_map)
        self.query_category_map = _int_keyed(config.query_category_map)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
    ) -> GuardLogits:
        """Run the backbone and both head paths.

        Args:
            input_ids: [B, T] token ids.
            attention_mask: [B, past + T], 1 for real tokens (any pattern: left pads, holes from ragged
                chunks).
            position_ids: [B, T] rotary positions; default 0.. after the cache.
            past_key_values: cache from earlier calls, extended in place.
            use_cache: return (and create if needed) the cache.
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        h = out.last_hidden_state
        x = self.risk_level_category_layernorm(self.risk_level_category_pre(h))
        q = self.query_risk_level_category_layernorm(self.query_risk_level_category_pre(h))
        return GuardLogits(
            risk_level=self.risk_level_head(x),
            category=self.category_head(x),
            query_risk_level=self.query_risk_level_head(q),
            query_category=self.query_category_head(q),
            past_key_values=out.past_key_values,
        )


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    single = directory / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    return load_file(single)


def load_stream_guard(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Qwen3StreamGuard:
    """Load a Qwen3Guard-Stream checkpoint strictly, without running any code from the checkpoint directory.

    Every expected key must be present; the only extra key tolerated is `lm_head.weight`.

    Raises:
        ValueError: naming the directory and the missing and unexpected keys.
    """
    directory = Path(path)
    raw = json.loads((directory / "config.json").read_text())
    missing_cfg = [k for k in GUARD_CONFIG_KEYS if k not in raw]
    if missing_cfg:
        raise ValueError(f"{directory}/config.json lacks Qwen3Guard-Stream keys: {missing_cfg}")
    config = Qwen3Config.from_pretrained(directory)
    with torch.device("meta"):
        model = Qwen3StreamGuard(config)
    state = _read_state_dict(directory)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected - TOLERATED_EXTRA_KEYS)
    if missing or unexpected:
        raise ValueError(
            f"{directory}: checkpoint does not match {ARCHITECTURE}: missing keys {missing}; unexpected keys "
            f"{unexpected}"
        )
    model.load_state_dict({k: state[k].to(dtype) for k in expected}, strict=True, assign=True)
    # The rotary frequencies are non-persistent buffers, never in the checkpoint: build them for real, and
    # keep them in float32 as transformers does (a module-wide `.to(dtype)` would round them to bf16).
    model.model.rotary_emb = Qwen3RotaryEmbedding(config)
    return model.to(device).eval()


def save_stream_guard(model: Qwen3StreamGuard, path: str | Path) -> None:
    """Write `config.json` and `model.safetensors` in the released Qwen3Guard-Stream layout."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config.update(architectures=[ARCHITECTURE], auto_map=AUTO_MAP, model_type="qwen3", dtype=dtype)
    for key in LABEL_MAP_KEYS:
        config[key] = {str(k): v for k, v in getattr(model, key).items()}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def stream_guard_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    guard_inner_size: int = 32,
    max_position_embeddings: int = 2048,
    **backbone: object,
) -> Qwen3Config:
    """A `Qwen3Config` with the Stream guard keys and the official label maps (spec §3.2), at any size."""
    maps = {
        "response_risk_level_map": dict(enumerate(RISK_LABELS)),
        "response_category_map": dict(enumerate(RESPONSE_CATEGORIES)),
        "query_risk_level_map": dict(enumerate(RISK_LABELS)),
        "query_category_map": dict(enumerate(CATEGORIES)),
    }
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=backbone.pop("intermediate_size", 3 * hidden_size),
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        guard_inner_size=guard_inner_size,
        num_risk_level=len(RISK_LABELS),
        num_category=len(RESPONSE_CATEGORIES),
        num_query_risk_level=len(RISK_LABELS),
        num_query_category=len(CATEGORIES),
        **{k: {str(i): v for i, v in m.items()} for k, m in maps.items()},
        **backbone,
    )


def write_synthetic_stream_guard(
    path: str | Path, tokenizer_dir: str | Path, seed: int = 0, **sizes: int
) -> Path:
    """Write a random Qwen3Guard-Stream checkpoint (real key names and config layout) plus a tokenizer.

    The tokenizer is copied from `tokenizer_dir` with its chat template replaced by plain Qwen3 ChatML (the
    Stream guard reads ordinary conversations, not Gen's moderation prompt). `sizes` go to
    `stream_guard_config` (hidden_size, num_hidden_layers, guard_inner_size, ...); `seed` fixes the weights.

    Returns:
        The checkpoint directory.
    """
    from saferl.guard.conversation import CHATML_TEMPLATE

    directory = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = CHATML_TEMPLATE
    config = stream_guard_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        **sizes,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3StreamGuard(config)
        # Head logits of order 1 (the RMSNorm output has unit scale), so that labels vary along a sequence
        # and tests on argmax labels mean something.
        heads = (
            model.risk_level_head,
            model.category_head,
            model.query_risk_level_head,
            model.query_category_head,
        )
        for head in heads:
            nn.init.normal_(head.weight, std=1.0 / config.guard_inner_size**0.5)
    save_stream_guard(model, directory)
    tokenizer.save_pretrained(directory)
    return directory
