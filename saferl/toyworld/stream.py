"""The toy world's Stream guard: token-labelled toy conversations, a held-out eval set, a cached guard.

Owns the toy world as a Stream data source (which responses each prompt gets, where each risky response's
first unsafe token is, the held-out set in the Qwen3GuardTest layout with `unsafe_start_index` /
`unsafe_end_index`) and `ensure_toy_stream` (build once, then reuse; `build.ensure_toy_stream_guard` from a
config). `toyworld:stream_guard` and `toyworld:stream_heldout` resolve to these paths in `saferl.references`.

Outputs, next to the world's other parts under `<cache_dir>/<key>/` (the world's key, unchanged):
  stream_guard/            Qwen3Guard-Stream checkpoint (released layout, ChatML tokenizer) + build.json
  stream_heldout.jsonl     held-out prompts x (compliance, a refusal, safe completion), Qwen3GuardTest rows

Shortcuts and choices:
- The backbone starts from the toy Gen guard, not the policy: it has half the policy's layers (2 vs 4), so
  it trains in about half the time and streams at half the cost per token, and it was trained to tell harm
  from benign and compliance from refusal, on these very texts (under the moderation template).
- Every conversation is [user, assistant] with one ground-truth response. Per prompt: its compliance
  (helpful, unsafe or controversial), one refusal (the three rotate over prompts) and, for harmful and
  controversial groups, the safe completion. Labels come from `world.response_verdict` / `prompt_verdict`.
- The first unsafe token is `first_unsafe_index` against every Safe response of the world: "Sure, here is
  how to" opens helpful answers too, so the trigger is the first token of the harmful request ("hurt", or
  "fake" in "write fake reviews", where "write" opens a benign answer). The annotated span of a held-out row
  runs from the trigger to the token before the colon that ends the restated request: the toy analogue of
  Qwen3GuardTest's first unsafe sentence. Controversial compliance rows are labelled Unsafe (the layout is
  binary), so strict and loose F1 differ as on the real benchmark.
- The held-out split is the world's (frames never seen in training); the response texts are shared.
- The build writes into a temporary directory and renames it, as the world's build does; `build.json` holds
  the recipe version, held-out token accuracies and timings. A different version rebuilds.
- A world built for a caller that needs it next (`ensure_built(..., stream_guard=True)`) trains it during its
  own build, on the core that would otherwise wait for the RM; `ensure_toy_stream` builds it on first use for
  a world that lacks it (`make train`'s, one built before, or a changed VERSION).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saferl.guard.conversation import encode_conversation, find_user_turn, role_tokens
from saferl.guard.stream_data import first_unsafe_index, prefix_set, response_labels, stream_example
from saferl.toyworld import world
from saferl.types import Prompt, SafetyLabel

if TYPE_CHECKING:
    from saferl.guard.stream_data import LabelMaps, StreamExample

VERSION = 1  # bump when the data or recipe below changes
PARTS = ("stream_guard", "stream_heldout")
# Recipe: ~50 s on one shared CPU thread, held-out token risk accuracy 1.0 (measured; see build.json).
STEPS, BATCH_SIZE, LR, WARMUP = 300, 32, 3e-3, 20


@dataclass(frozen=True)
class ToyStreamPaths:
    guard: Path  # checkpoint directory
    heldout: Path  # Qwen3GuardTest-layout JSONL


def toy_stream_paths(world_root: str | Path) -> ToyStreamPaths:
    root = Path(world_root)
    return ToyStreamPaths(root / "stream_guard", root / "stream_heldout.jsonl")


@dataclass(frozen=True)
class ToyConversation:
    """One labelled toy conversation; indices are absolute positions in `ids` (the templated sequence)."""

    id: str
    messages: list[dict[str, str]]
    ids: list[int]
    user_end: int
    label: SafetyLabel
    category: str | None
    trigger: int | None  # first unsafe token (None for Safe responses)
    span_end: int | None  # last token of the annotated unsafe span


def toy_responses(prompt: Prompt) -> list[tuple[str, str]]:
    """(style, text) of the responses a prompt gets: compliance, one refusal, the safe completion if any."""
    by_style = world.responses_for(prompt)
    meta = prompt.meta
    refusal = world.REFUSALS[(meta["intent"] + meta["slot"] + meta["frame"]) % len(world.REFUSALS)]
    out = [(style, texts[0]) for style, texts in by_style.items() if style != "refusal"]
    return out + [("refusal", refusal)]


def safe_prefixes(tokenizer: Any, roles: Any) -> set[tuple[int, ...]]:
    """`prefix_set` of the tokens after the user's `<|im_end|>` of every Safe response in the world."""
    texts = {text for p in world.make_prompts("train") for style, texts in world.responses_for(p).items()
             if world.response_verdict(p, style).safety is SafetyLabel.SAFE for text in texts}
    out = []
    for text in sorted(texts):
        ids = encode_conversation(tokenizer, [{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": text}])
        out.append(ids[find_user_turn(ids, roles)[1] + 1 :])
    return prefix_set(out)


def label_conversations(prompts: list[Prompt], tokenizer: Any) -> list[ToyConversation]:
    """Every toy conversation of `prompts` (see `toy_responses`), tokenised and labelled."""
    roles = role_tokens(tokenizer)
    safe = safe_prefixes(tokenizer, roles)
    out = []
    for p in prompts:
        for style, text in toy_responses(p):
            messages = [*p.messages, {"role": "assistant", "content": text}]
            ids = encode_conversation(tokenizer, messages)
            user_end = find_user_turn(ids, roles)[1]
            verdict = world.response_verdict(p, style)
            trigger = span_end = None
            if verdict.safety is not SafetyLabel.SAFE:
                first = first_unsafe_index(ids[user_end + 1 :], safe)
                if first is None:
                    raise ValueError(f"{p.id}: the {style} response is the start of a safe one")
                trigger = user_end + 1 + first
                colon = next((i for i in range(trigger, len(ids)) if tokenizer.decode([ids[i]]) == ":"), None)
                span_end = max(trigger, colon - 1) if colon is not None else len(ids) - 1
            category = verdict.categories[0] if verdict.categories else None
            out.append(ToyConversation(f"{p.id}/{style}", messages, ids, user_end, verdict.safety, category,
                                       trigger, span_end))
    return out


def toy_examples(conversations: list[ToyConversation], prompts: dict[str, Prompt],
                 maps: LabelMaps) -> list[StreamExample]:
    """Training examples: response tokens Safe before the trigger, the label from it on; the prompt's label
    at the user's `<|im_end|>`."""
    out = []
    for c in conversations:
        prompt = prompts[c.id.rsplit("/", 1)[0]]
        q_label, q_cats = world.prompt_verdict(prompt)
        trigger = None if c.trigger is None else c.trigger - c.user_end - 1
        risks, cats = response_labels(len(c.ids) - c.user_end - 1, trigger, c.label, c.category)
        out.append(stream_example(c.ids, c.user_end, risks, cats, q_label, q_cats[0] if q_cats else None,
                                  maps))
    return out


def heldout_rows(conversations: list[ToyConversation]) -> list[dict[str, Any]]:
    """Qwen3GuardTest-layout rows: `message`, binary `label`, the span on risky rows, `style`, `category`."""
    rows = []
    for c in conversations:
        row: dict[str, Any] = {"id": c.id, "message": c.messages,
                               "label": "Safe" if c.label is SafetyLabel.SAFE else "Unsafe",
                               "style": c.id.rsplit("/", 1)[1], "category": c.category}
        if c.trigger is not None:
            row.update(unsafe_start_index=c.trigger, unsafe_end_index=c.span_end)
        rows.append(row)
    return rows


def build_toy_stream_guard(world_root: str | Path) -> ToyStreamPaths:
    """Train the toy Stream guard from the built world at `world_root` and write the held-out set."""
    from saferl.runtime import configure_process

    configure_process()
    from transformers import AutoTokenizer

    from saferl.guard.conversation import CHATML_TEMPLATE
    from saferl.guard.evaluate import write_atomic
    from saferl.guard.stream_data import LabelMaps
    from saferl.guard.stream_train import (
        init_stream_guard,
        save_trained_stream_guard,
        token_accuracy,
        train_stream_guard,
    )

    root = Path(world_root)
    paths = toy_stream_paths(root)
    seed = json.loads((root / "config.json").read_text())["seed"]
    start = time.monotonic()
    print(f"[toyworld] training the toy Stream guard into {paths.guard}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(root / "guard")
    tokenizer.chat_template = CHATML_TEMPLATE  # the Stream guard reads plain conversations
    train_prompts, test_prompts = world.make_prompts("train"), world.make_prompts("heldout")
    by_id = {p.id: p for p in train_prompts + test_prompts}
    train_convs = label_conversations(train_prompts, tokenizer)
    test_convs = label_conversations(test_prompts, tokenizer)
    model = init_stream_guard(root / "guard", seed=seed)
    model.config.max_position_embeddings = 2048  # plain RoPE: positions past the Gen guard's 1024 are fine
    maps = LabelMaps.from_model(model)
    losses = train_stream_guard(model, toy_examples(train_convs, by_id, maps), pad_id=tokenizer.pad_token_id,
                                steps=STEPS, batch_size=BATCH_SIZE, lr=LR, warmup_steps=WARMUP, seed=seed,
                                label="stream_guard", log_every=100)
    train_seconds = time.monotonic() - start
    metrics = token_accuracy(model, toy_examples(test_convs, by_id, maps), pad_id=tokenizer.pad_token_id)
    tmp = paths.guard.with_name(f"{paths.guard.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_trained_stream_guard(model, tokenizer, tmp)
    info = {"version": VERSION, "backbone": "guard", "steps": STEPS, "batch_size": BATCH_SIZE, "lr": LR,
            "train_examples": len(train_convs), "first_loss": losses[0], "last_loss": losses[-1],
            "heldout": metrics, "train_seconds": round(train_seconds, 1),
            "build_seconds": round(time.monotonic() - start, 1)}
    (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    write_atomic(paths.heldout, "".join(json.dumps(r) + "\n" for r in heldout_rows(test_convs)))
    shutil.rmtree(paths.guard, ignore_errors=True)
    tmp.rename(paths.guard)
    print(f"[toyworld] Stream guard done in {info['build_seconds']:.0f}s: held-out token risk accuracy "
          f"{metrics['token_risk_acc']:.4f}, query risk accuracy {metrics['query_risk_acc']:.4f}", flush=True)
    return paths


def ensure_toy_stream(world_root: str | Path) -> ToyStreamPaths:
    """The toy Stream guard and held-out set of the built world at `world_root`, built on first use (after
    any other process building them: `lock.build_lock` on `stream_guard.lock`)."""
    from saferl.toyworld.lock import build_lock

    paths = toy_stream_paths(world_root)
    if _is_built(paths):
        return paths
    with build_lock(paths.guard):
        return paths if _is_built(paths) else build_toy_stream_guard(world_root)


def _is_built(paths: ToyStreamPaths) -> bool:
    info = paths.guard / "build.json"
    return info.is_file() and paths.heldout.is_file() and json.loads(info.read_text())["version"] == VERSION
