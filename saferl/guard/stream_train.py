"""Training Qwen3Guard-Stream heads on any Qwen3 backbone: token labels, JSONL rows, the paper's loss, loop.

Owns `StreamExample` (a token-labelled conversation), the pure label builders (the prefix rule that places
the first unsafe token, per-token labels, the query label at the user's `<|im_end|>`), the training-row
layout of `saferl guard train-stream` (`load_stream_rows`, `encode_stream_rows`), `init_stream_guard` (a
Stream model from a Qwen3 backbone checkpoint or from an existing Stream checkpoint), `stream_loss`
(spec/qwen3guard.md §3.5), `train_stream_guard`, `save_trained_stream_guard` (released layout plus a ChatML
tokenizer) and `token_accuracy`. The toy world's data source lives in `saferl.toyworld.stream`.

Training rows (JSONL, one object a line; Qwen3GuardTest's layout plus two optional fields):
  {"message": [{"role": "user", ...}, {"role": "assistant", ...}], "label": "Unsafe",
   "unsafe_start_index": 41, "category": "Violent"}
`messages` is accepted for `message`. The last message's role picks the row's kind. A response row trains the
response heads: tokens before `unsafe_start_index` (an absolute index in the templated conversation, as in
the `*_loc` splits) are Safe, it and every later token carry `label`; without the index the label starts at
the assistant's content. A prompt row trains the query heads at the user's `<|im_end|>`. `label` is Safe,
Unsafe or Controversial; `category` (optional: no category loss without it) is a name from the model's maps.

Shortcuts and choices:
- The loss follows the paper (§4.3): response loss = sum over response tokens of risk CE, plus category CE
  where the gold risk is Unsafe or Controversial, divided by the number of response tokens in the batch
  (a token mean over the batch, not a mean of per-conversation means); query loss = risk CE plus category CE
  (risky prompts only) at the user's `<|im_end|>`, averaged over the rows that carry a query label; total =
  sum. A JSONL response row carries no query label; toy examples carry both.
- "Response tokens" are every position after the user's `<|im_end|>` (the assistant header and think
  scaffold included): the streaming reader (`saferl.guard.stream`) reads the response heads at all of them.
- Token labels come from the data, not from an LM ensemble and a judge as in the paper (§4.2):
  `first_unsafe_index` places the trigger where a response stops being the beginning of any safe text.
- Batches are right-padded with no attention mask: attention is causal, so padding after a row's last token
  never reaches its real positions (and padded positions carry no loss).
- The optimisation loop is `saferl.sft`'s (AdamW, linear warm-up, cosine decay to 10%, clipping at 1).
  `freeze_backbone=True` trains the heads only (no gradient flows into the backbone at all).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from saferl.guard.conversation import CHATML_TEMPLATE, encode_conversation, find_user_turn, role_tokens
from saferl.guard.stream_model import (
    GUARD_CONFIG_KEYS,
    GuardLogits,
    Qwen3StreamGuard,
    load_stream_guard,
    save_stream_guard,
    stream_guard_config,
)
from saferl.types import SafetyLabel

IGNORE = -100  # label index of positions that carry no loss


@dataclass(frozen=True)
class StreamExample:
    """One token-labelled conversation (label indices in the model's own label maps).

    Attributes:
        input_ids: [T] the full templated conversation.
        risk: [T] response risk index per position; IGNORE up to and including the user's `<|im_end|>`.
        category: [T] response category index where the gold risk is not Safe and known, else IGNORE.
        query_index: position of the `<|im_end|>` closing the user turn (where the query heads are read).
        query_risk: query risk index of the prompt, IGNORE when the example carries no query label.
        query_category: query category index, IGNORE when the prompt is Safe or its category unknown.
    """

    input_ids: list[int]
    risk: list[int]
    category: list[int]
    query_index: int
    query_risk: int
    query_category: int


@dataclass(frozen=True)
class LabelMaps:
    """Label name -> head index for the four heads, read from a Stream model (names looked up, never assumed
    to be in a fixed order: spec §3.2)."""

    risk: dict[str, int]
    category: dict[str, int]
    query_risk: dict[str, int]
    query_category: dict[str, int]

    @classmethod
    def from_model(cls, model: Qwen3StreamGuard) -> LabelMaps:
        def inverse(m: dict[int, str]) -> dict[str, int]:
            return {name: i for i, name in m.items()}

        return cls(inverse(model.response_risk_level_map), inverse(model.response_category_map),
                   inverse(model.query_risk_level_map), inverse(model.query_category_map))


# ---------------------------------------------------------------- labels (pure)


def prefix_set(sequences: Iterable[Sequence[int]]) -> set[tuple[int, ...]]:
    """Every non-empty prefix of every sequence (a flat prefix tree for `first_unsafe_index`)."""
    out: set[tuple[int, ...]] = set()
    for seq in sequences:
        seq = tuple(seq)
        out.update(seq[: i + 1] for i in range(len(seq)))
    return out


def first_unsafe_index(response_ids: Sequence[int], safe_prefixes: set[tuple[int, ...]]) -> int | None:
    """The trigger of a risky response: the first token where it stops being the beginning of any safe text.

    Tokens before it could still be heading for a safe answer (a shared opening such as "Sure, here is how
    to"); the token that rules that out is the first one the risky content shows in.

    Args:
        response_ids: the response's tokens (everything after the user's `<|im_end|>`).
        safe_prefixes: `prefix_set` of the safe responses, tokenised the same way.

    Returns:
        Index into `response_ids`, or None when the whole response is a prefix of some safe text.
    """
    for i in range(len(response_ids)):
        if tuple(response_ids[: i + 1]) not in safe_prefixes:
            return i
    return None


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def response_labels(n: int, trigger: int | None, label: SafetyLabel | str,
                    category: str | None) -> tuple[list[str], list[str | None]]:
    """Per-token (risk, category) names of an n-token response: Safe before `trigger`, `label` from it on.

    Args:
        n: number of response tokens.
        trigger: index of the first unsafe token (None, or a Safe `label`: all Safe).
        label: the response's label.
        category: its category (None when unknown: those tokens then carry no category loss).
    """
    label = SafetyLabel(label)
    if trigger is None or label is SafetyLabel.SAFE:
        return [SafetyLabel.SAFE.value] * n, [None] * n
    if not 0 <= trigger < n:
        raise ValueError(f"trigger {trigger} outside the response's {n} tokens")
    return ([SafetyLabel.SAFE.value] * trigger + [label.value] * (n - trigger),
            [None] * trigger + [category] * (n - trigger))


def stream_example(input_ids: Sequence[int], query_index: int, risks: Sequence[str],
                   categories: Sequence[str | None], query_label: SafetyLabel | str | None,
                   query_category: str | None, maps: LabelMaps) -> StreamExample:
    """A `StreamExample` from label names: `risks`/`categories` cover the positions after `query_index`
    (all of them); `query_label` None gives the example no query loss, a None category no category loss."""
    n = len(input_ids) - query_index - 1
    if len(risks) != n or len(categories) != n:
        raise ValueError(f"{n} response positions but {len(risks)} risks and {len(categories)} categories")
    head = [IGNORE] * (query_index + 1)
    query = None if query_label is None else SafetyLabel(query_label)
    risky_prompt = query is not None and query is not SafetyLabel.SAFE and query_category is not None
    return StreamExample(
        input_ids=list(input_ids),
        risk=head + [maps.risk[r] for r in risks],
        category=head + [maps.category[c] if c is not None and r != SafetyLabel.SAFE.value else IGNORE
                         for r, c in zip(risks, categories)],
        query_index=query_index,
        query_risk=IGNORE if query is None else maps.query_risk[query.value],
        query_category=maps.query_category[query_category] if risky_prompt else IGNORE,
    )


# ---------------------------------------------------------------- JSONL rows


@dataclass(frozen=True)
class StreamRow:
    """One validated training row (see the module docstring); `where` is its `file:line`."""

    where: str
    messages: list[dict[str, str]]
    label: SafetyLabel
    category: str | None = None
    unsafe_start_index: int | None = None


def parse_stream_row(row: object, where: str) -> StreamRow:
    """Validate one training row; errors start with `where`."""
    from saferl.data import check_messages
    from saferl.guard.gen import _optional_index, _optional_str

    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    fields = [k for k in ("message", "messages") if k in row]
    if len(fields) != 1:
        raise ValueError(f"{where}: give exactly one of 'message' (Qwen3GuardTest) or 'messages'")
    messages = check_messages(row[fields[0]], where, fields[0])
    role = messages[-1]["role"]
    if role not in ("user", "assistant"):
        raise ValueError(f"{where}: the last message must be the user's or the assistant's, got {role!r}")
    labels = [label.value for label in SafetyLabel]
    if row.get("label") not in labels:
        raise ValueError(f"{where}: 'label' must be one of {labels}, got {row.get('label')!r}")
    label = SafetyLabel(row["label"])
    start = _optional_index(row, "unsafe_start_index", where)
    if start is not None and (label is SafetyLabel.SAFE or role == "user"):
        raise ValueError(f"{where}: 'unsafe_start_index' belongs on Unsafe/Controversial response rows only")
    return StreamRow(where, messages, label, _optional_str(row, "category", where), start)


def load_stream_rows(path: str | Path) -> list[StreamRow]:
    """All training rows of a JSONL file; a missing, empty or malformed file names the file (and line)."""
    from saferl.data import read_jsonl

    rows = [parse_stream_row(row, where) for where, row in read_jsonl(path)]
    if not rows:
        raise ValueError(f"{path}: no rows (the file is empty)")
    return rows


def encode_stream_rows(rows: Sequence[StreamRow], tokenizer: Any, maps: LabelMaps) -> list[StreamExample]:
    """Render and label each row with the guard's tokenizer (ChatML template); errors name the row's line."""
    roles = role_tokens(tokenizer)
    out = []
    for row in rows:
        ids = encode_conversation(tokenizer, row.messages)
        try:
            _, user_end = find_user_turn(ids, roles)
        except ValueError as e:
            raise ValueError(f"{row.where}: {e}") from e
        if user_end is None:
            raise ValueError(f"{row.where}: the last user turn has no closing <|im_end|>")
        prompt_row = row.messages[-1]["role"] == "user"
        names = maps.query_category if prompt_row else maps.category
        if row.category is not None and row.category not in names:
            raise ValueError(f"{row.where}: unknown category {row.category!r}; the model's: {sorted(names)}")
        if prompt_row:
            out.append(stream_example(ids[: user_end + 1], user_end, [], [], row.label, row.category, maps))
            continue
        start = row.unsafe_start_index
        if start is None and row.label is not SafetyLabel.SAFE:  # from the assistant's content on
            empty = encode_conversation(tokenizer, [*row.messages[:-1], {"role": "assistant", "content": ""}])
            start = common_prefix_length(ids, empty)
        if start is not None and not user_end < start < len(ids):
            raise ValueError(f"{row.where}: unsafe_start_index {start} is outside the response (tokens "
                             f"{user_end + 1}..{len(ids) - 1} of the templated conversation)")
        trigger = None if start is None else start - user_end - 1
        risks, categories = response_labels(len(ids) - user_end - 1, trigger, row.label, row.category)
        out.append(stream_example(ids, user_end, risks, categories, None, None, maps))
    return out


# ---------------------------------------------------------------- model


def _init_heads(model: Qwen3StreamGuard, seed: int) -> None:
    """Real, seeded weights for every module outside the backbone (the two head paths)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in model.named_children():
            if name == "model":
                continue
            module.to_empty(device="cpu")
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=model.config.initializer_range)
            else:  # RMSNorm
                nn.init.ones_(module.weight)


def init_stream_guard(path: str | Path, *, guard_inner_size: int | None = None,
                      seed: int = 0) -> Qwen3StreamGuard:
    """A float32 Stream guard to train, from a Stream checkpoint or from a Qwen3 backbone.

    A directory whose config carries Stream keys loads as is (`load_stream_guard`). Any other Qwen3
    checkpoint (Qwen3ForCausalLM or a sequence classifier: its `model.*` weights; a bare Qwen3Model: all its
    weights) becomes the backbone, and the heads start from seeded random weights with the official label
    maps (spec §3.2).

    Args:
        path: checkpoint directory (config.json + safetensors).
        guard_inner_size: G for new heads (default hidden_size // 2, as the 0.6B guard's 512 for 1024).
        seed: seed of the new heads.
    """
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    from saferl.guard.stream_model import _read_state_dict

    directory = Path(path)
    raw = json.loads((directory / "config.json").read_text())
    if any(k in raw for k in GUARD_CONFIG_KEYS):
        if guard_inner_size not in (None, raw.get("guard_inner_size")):
            raise ValueError(f"{directory} is a Stream guard with guard_inner_size "
                             f"{raw.get('guard_inner_size')}, not {guard_inner_size}")
        return load_stream_guard(directory).train()
    config = Qwen3Config.from_pretrained(directory)
    inner = guard_inner_size or config.hidden_size // 2
    keys = stream_guard_config(vocab_size=config.vocab_size, guard_inner_size=inner)
    for key in GUARD_CONFIG_KEYS:
        setattr(config, key, getattr(keys, key))
    with torch.device("meta"):
        model = Qwen3StreamGuard(config)
    state = _read_state_dict(directory)
    if any(k.startswith("model.") for k in state):  # a causal LM or classifier: its backbone
        backbone = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    else:  # a bare Qwen3Model
        backbone = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = set(model.model.state_dict())
    missing, unexpected = sorted(expected - set(backbone)), sorted(set(backbone) - expected)
    if missing or unexpected:
        raise ValueError(f"{directory}: not a Qwen3 backbone of this config: missing keys {missing}; "
                         f"unexpected keys {unexpected}")
    model.model.load_state_dict({k: v.float() for k, v in backbone.items()}, strict=True, assign=True)
    _init_heads(model, seed)
    model.model.rotary_emb = Qwen3RotaryEmbedding(config)  # non-persistent buffers: never in a checkpoint
    return model.float().train()


def save_trained_stream_guard(model: Qwen3StreamGuard, tokenizer: Any, path: str | Path) -> Path:
    """Save `model` in the released layout and `tokenizer` with Qwen3 ChatML as its chat template (the Stream
    guard reads plain conversations: a Gen guard's moderation template would be wrong here)."""
    directory = Path(path)
    save_stream_guard(model, directory)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- loss and loop


def collate(batch: Sequence[StreamExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `risk`, `category` [B, T]; `query_index`, `query_risk`, `query_category`
    [B]."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    risk = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    category = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        risk[i, : len(e.risk)] = torch.tensor(e.risk)
        category[i, : len(e.category)] = torch.tensor(e.category)
    return {"input_ids": ids, "risk": risk, "category": category,
            "query_index": torch.tensor([e.query_index for e in batch]),
            "query_risk": torch.tensor([e.query_risk for e in batch]),
            "query_category": torch.tensor([e.query_category for e in batch])}


def stream_loss(logits: GuardLogits, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's Stream loss (see the module docstring) from head logits over a collated batch.

    Args:
        logits: the four heads' logits, [B, T, C] each.
        batch: `collate` output.

    Returns:
        `loss` (= `response` + `query`), `response` and `query`, scalar tensors (0 when no row has labels of
        that kind).
    """
    risk, category = batch["risk"], batch["category"]
    n = (risk != IGNORE).sum().clamp(min=1)
    response = (F.cross_entropy(logits.risk_level.flatten(0, 1).float(), risk.flatten(), ignore_index=IGNORE,
                                reduction="sum")
                + F.cross_entropy(logits.category.flatten(0, 1).float(), category.flatten(),
                                  ignore_index=IGNORE, reduction="sum")) / n
    rows = torch.arange(risk.shape[0], device=risk.device)
    q = batch["query_index"]
    m = (batch["query_risk"] != IGNORE).sum().clamp(min=1)
    query = (F.cross_entropy(logits.query_risk_level[rows, q].float(), batch["query_risk"],
                             ignore_index=IGNORE, reduction="sum")
             + F.cross_entropy(logits.query_category[rows, q].float(), batch["query_category"],
                               ignore_index=IGNORE, reduction="sum")) / m
    return {"loss": response + query, "response": response, "query": query}


def _loss(model: Qwen3StreamGuard, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    return stream_loss(model(batch["input_ids"]), batch)["loss"]


def train_stream_guard(model: Qwen3StreamGuard, examples: Sequence[StreamExample], *, pad_id: int, steps: int,
                       batch_size: int, lr: float, warmup_steps: int = 20, freeze_backbone: bool = False,
                       seed: int = 0, label: str = "stream", log_every: int = 50) -> list[float]:
    """Train the Stream heads (and the backbone unless `freeze_backbone`) on `examples` with `stream_loss`.

    Returns:
        The loss per step. The model is left in eval mode (and its backbone frozen, if asked).
    """
    from saferl.sft import _fit

    model.model.requires_grad_(not freeze_backbone)
    return _fit(model, examples, collate, _loss, pad_id=pad_id, steps=steps, batch_size=batch_size, lr=lr,
                warmup_steps=warmup_steps, seed=seed, label=label, log_every=log_every)


@torch.inference_mode()
def token_accuracy(model: Qwen3StreamGuard, examples: Sequence[StreamExample], *, pad_id: int,
                   batch_size: int = 64) -> dict[str, float]:
    """Argmax accuracy against the examples' own labels: `token_risk_acc` over response tokens,
    `token_category_acc` over risky tokens, `query_risk_acc` and `query_category_acc` (risky prompts) at
    the user's `<|im_end|>`, and `response_tokens`, the count behind the first."""
    device = next(model.parameters()).device
    hits = dict.fromkeys(("risk", "category", "query_risk", "query_category"), 0)
    totals = dict.fromkeys(hits, 0)
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        out = model(batch["input_ids"])
        rows = torch.arange(len(batch["query_index"]), device=device)
        pairs = {
            "risk": (out.risk_level.argmax(-1), batch["risk"]),
            "category": (out.category.argmax(-1), batch["category"]),
            "query_risk": (out.query_risk_level[rows, batch["query_index"]].argmax(-1), batch["query_risk"]),
            "query_category": (out.query_category[rows, batch["query_index"]].argmax(-1),
                               batch["query_category"]),
        }
        for name, (pred, gold) in pairs.items():
            where = gold != IGNORE
            hits[name] += int((pred[where] == gold[where]).sum())
            totals[name] += int(where.sum())
    names = {"risk": "token_risk_acc", "category": "token_category_acc", "query_risk": "query_risk_acc",
             "query_category": "query_category_acc"}
    return {**{names[k]: hits[k] / max(1, totals[k]) for k in hits}, "response_tokens": float(totals["risk"])}
