"""`saferl toyworld build`: the embedded world's prompts, tokenizer and three tiny models, built offline.

Outputs, under `<cache_dir>/<key>/` where the key hashes the toy-world config (a changed config rebuilds):
  train.jsonl, heldout.jsonl   prompts (`saferl.data` format)
  policy/                      Qwen3ForCausalLM fine-tuned to a mixed behaviour RL has to fix
  guard/                       Qwen3ForCausalLM emitting Qwen3Guard-Gen verdicts, with the guard chat template
  judge/                       a larger Gen-format guard on other perturbation draws and seed: the independent
                               judge of held-out evaluation and of the reward-hacking monitor (eval.judge)
  reward_model/                Qwen3ForSequenceClassification helpfulness RM (1 label)
  reward_model_1, _2/          two more RMs (other seeds, each without one training frame): an ensemble
  metrics.json                 held-out quality of the world's core (policy, guard, reward_model)
  extras.json                  held-out quality of the judge and the two further RMs, built on first use
The guard, judge and RMs also train on perturbed responses (`world.PERTURBATIONS`: splices, near-miss
misspellings, truncations, repeats, dropped words, the right category's text after the wrong prompt), the text
RL found when they had only seen clean responses; `toyworld.perturbations: 0` builds them the old way.
Every directory loads with plain `from_pretrained`. The build writes into a temporary directory and renames
it when complete, so an interrupted build never leaves a half-written world behind. A world that misses its
quality targets (`evaluate.TARGETS`) is an error: the build raises after caching it (kept for inspection), and
`ensure_built` raises again rather than reuse it.

Shortcut: two processes, one per core: the guard trains here and is then evaluated on the held-out prompts
while a second process trains the policy and then the RM and evaluates both. With `stream_guard` (callers
that need the Stream guard next: `ensure_toy_stream_guard`, `saferl toyworld build`, the Stream
references) this process then trains the Stream guard on the guard (`stream.build_toy_stream_guard`) in the
time it would wait for the RM, instead of after the world: guard ~300 s + its eval ~50 s + Stream guard
~85 s against policy ~220 s + RM ~185 s + their evals ~30 s on a quiet machine (12f5a12's build; under load
5 the two sides took 802 s and 814 s, benchmarks/results/toyworld_build_schedule.md). `make train` needs no
Stream guard and does not ask for one (the sides come out about even, so it would cost it nothing much, but
not nothing). The extra parts likewise: the judge here, the two further RMs in a second process.
A lock file next to the key's directory (`<key>.lock`, `build_lock`) makes a second process that wants the
same world at the same time (two `make train`s, two test workers) wait for the first and reuse its world
instead of building it again.

`trainer="trl"` (`saferl toyworld build --trainer trl`) trains every model through trl.SFTTrainer (guards,
policy) and transformers.Trainer (RMs) with SafeRL's batches and heads (`saferl.sft_batched`), into a key of
its own; the default, the hand-written loop of `saferl.sft`, keeps the key it had before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saferl.config import ModelShape, SFTConfig, ToyWorldConfig
from saferl.runtime import configure_process
from saferl.toyworld import world
from saferl.toyworld.lock import build_lock

BUILD_VERSION = 5  # bump when the world or the build recipe changes
RM_MEMBERS = ("reward_model", "reward_model_1", "reward_model_2")
CORE_PARTS = ("policy", "guard", "reward_model", "train", "heldout")
# Built on first use of any of them (`ensure_part`), all three at once: runs and tests that use neither the
# judge nor the ensemble do not pay for them (about 6 CPU-minutes).
EXTRA_PARTS = ("judge", "reward_model_1", "reward_model_2")
PARTS = CORE_PARTS + EXTRA_PARTS


@dataclass(frozen=True)
class ToyWorldPaths:
    root: Path

    def part(self, name: str) -> Path:
        if name not in PARTS:
            raise ValueError(f"unknown toy world part {name!r}; expected one of {PARTS}")
        return self.root / (f"{name}.jsonl" if name in ("train", "heldout") else name)


TRAINERS = ("saferl", "trl")  # the hand-written loop (`saferl.sft`), or TRL's trainers (`saferl.sft_batched`)


def world_key(cfg: ToyWorldConfig, trainer: str = "saferl") -> str:
    fields = dataclasses.asdict(cfg)
    fields.pop("cache_dir")
    # the default's key is the key before TRAINERS; the TRL recipe's own version (2: sft._fit's optimizer and
    # schedule objects, `sft_batched`) rebuilds only the TRL world
    extra = {} if trainer == "saferl" else {"trainer": trainer, "trl_recipe": 2}
    blob = json.dumps({"version": BUILD_VERSION, **fields, **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def toyworld_paths(cfg: ToyWorldConfig, trainer: str = "saferl") -> ToyWorldPaths:
    return ToyWorldPaths(Path(cfg.cache_dir) / world_key(cfg, trainer))


def ensure_built(cfg: ToyWorldConfig, trainer: str = "saferl", *, stream_guard: bool = False) -> ToyWorldPaths:
    """The built world for `cfg`, building it first when the cache has none (with its Stream guard when
    `stream_guard`: callers that need it next); while another process builds it, waits for that build and
    reuses it (`build_lock`). Raises ValueError when the world (cached or new) misses its quality targets."""
    from saferl.toyworld.evaluate import check_targets

    paths = toyworld_paths(cfg, trainer)
    metrics = paths.root / "metrics.json"
    if not metrics.is_file():
        with build_lock(paths.root):
            if not metrics.is_file():  # no other process built it while this one waited
                return _build(cfg, trainer, stream_guard)
    check_targets(json.loads(metrics.read_text()), str(paths.root))
    return paths


def ensure_part(cfg: ToyWorldConfig, part: str, trainer: str = "saferl") -> Path:
    """The directory or file of one part of the built world, building the world first and, for an extra part
    (`EXTRA_PARTS`), every missing extra part when the cache lacks it."""
    from saferl.toyworld.evaluate import EXTRA_TARGETS, check_targets

    paths = ensure_built(cfg, trainer)
    extras = paths.root / "extras.json"
    if part not in EXTRA_PARTS:
        return paths.part(part)
    if not extras.is_file():  # one process builds them; another asking meanwhile waits and reuses them
        with build_lock(paths.root / "extras"):
            if not extras.is_file():
                build_extras(paths, cfg, trainer)  # checks their targets itself
                return paths.part(part)
    check_targets(json.loads(extras.read_text()), str(paths.root), EXTRA_TARGETS)  # a cached miss is refused
    return paths.part(part)


def ensure_toy_stream_guard(cfg: ToyWorldConfig | None = None) -> Path:
    """Checkpoint directory of the toy Stream guard for `cfg` (default: the schema's toy world), building the
    world (with the Stream guard, `build(stream_guard=True)`) or the guard when the cache lacks them. Here, not
    in `stream`, so that `stream` does not import this module (which imports `stream`)."""
    from saferl.toyworld.stream import ensure_toy_stream

    return ensure_toy_stream(ensure_built(cfg or ToyWorldConfig(), stream_guard=True).root).guard


# ---------------------------------------------------------------- data


def _style_mix(cfg: ToyWorldConfig) -> dict[str, float]:
    return {k: getattr(cfg, k) for k in ("harmful_unsafe", "harmful_refusal", "benign_refusal",
                                         "controversial_comply")}


def _policy_examples(tokenizer, cfg: ToyWorldConfig) -> list:
    from saferl.sft import chat_example

    rng = random.Random(cfg.seed)
    out = []
    for p in world.make_prompts("train"):
        for _ in range(2):  # two draws per prompt smooth the learned style mix
            style = world.sample_policy_style(p, rng, _style_mix(cfg))
            text = rng.choice(world.responses_for(p)[style])
            out.append(chat_example(tokenizer, p.messages, text, enable_thinking=False))
    return out


def _response_pool(prompts: list) -> list[str]:
    """Texts that splices borrow words from: every response of every 50th prompt."""
    return [t for p in prompts[::50] for texts in world.responses_for(p).values() for t in texts]


def _guard_examples(tokenizer, prompts: list, perturbations: int, seed: int) -> list:
    """Prompt- and response-moderation examples. Prompt mode (one example per prompt against ~4.5 responses)
    is repeated 3x and the small controversial group 2x: without that, held-out prompt-mode accuracy on
    harmful prompts was 12% and controversial compliance was always called Unsafe. `perturbations` corrupted
    compliances and safe completions per prompt keep the label of the text they were made from: an unsafe
    answer with a misspelled word or a cut-off end is still unsafe, which is what stops a policy from hiding
    unsafe text behind corruption."""
    from saferl.guard.templates import format_verdict, moderation_messages
    from saferl.sft import chat_example

    rng, pool = random.Random(seed), _response_pool(prompts)
    out = []
    for p in prompts:
        label, cats = world.prompt_verdict(p)
        repeat = 2 if p.kind == "controversial" else 1
        out += [chat_example(tokenizer, moderation_messages(p.messages, None),
                             format_verdict(label, cats, None))] * (3 * repeat)
        responses = [(text, style) for style, texts in world.responses_for(p).items() for text in texts]
        styles = ("helpful", "unsafe", "controversial", "safe_completion")
        responses += world.perturbed_responses(p, rng, pool, perturbations, styles) if perturbations else []
        for text, style in responses:
            v = world.response_verdict(p, style)
            out += [chat_example(tokenizer, moderation_messages(p.messages, text),
                                 format_verdict(v.safety, v.categories, v.refusal))] * repeat
    return out


def _rm_examples(tokenizer, prompts: list, seed: int, perturbations: int) -> list:
    """The RM's training answers, grouped by prompt (`RegressionExample.group`, in a seeded order so a batch
    mixes groups and topics): every clean response, an off-topic answer, and `perturbations` corrupted answers
    scored as garbled, trained with the pairwise term (`sft.train_regression`); with 0, one splice, cut or
    repeat instead and no pairwise term (the worlds before build 5)."""
    from saferl.helpfulness import render_pair
    from saferl.sft import RegressionExample

    rng, pool = random.Random(seed), _response_pool(prompts)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    out = []
    for group, p in zip(order, prompts):
        responses = world.responses_for(p)
        if perturbations:
            scored = [(text, style) for style, texts in responses.items() for text in texts]
            scored.append((world.off_topic_response(p, rng), "off_topic"))
            scored += [(text, "garbled") for text, _ in world.perturbed_responses(p, rng, pool, perturbations)]
        else:
            scored = [(text, style) for style, texts in responses.items() for text in texts]
            scored.append((world.off_topic_response(p, rng), "off_topic"))
            scored.append((world.garble(rng.choice(scored)[0], rng, pool), "garbled"))
        for text, style in scored:
            ids = tokenizer(render_pair(tokenizer, p.messages, text), add_special_tokens=False)["input_ids"]
            out.append(RegressionExample(ids, world.helpfulness_target(style), group))
    return out


# ---------------------------------------------------------------- models


def new_model(shape: ModelShape, tokenizer, *, head: str, seed: int):
    """A randomly initialised tiny Qwen3: `head` is `lm` (causal LM) or `score` (1-label classifier)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3ForSequenceClassification

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim, max_position_embeddings=1024,
        tie_word_embeddings=head == "lm", rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        num_labels=1, dtype="float32")
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config) if head == "lm" else Qwen3ForSequenceClassification(config)


def _part_seed(part: str, seed: int) -> int:
    """Each judge model its own seed (init, data order, perturbation draws): an ensemble or a judge that
    shares the reward model's draws would share its blind spots."""
    return seed + {"policy": 0, "guard": 0, "reward_model": 0, "reward_model_1": 1, "reward_model_2": 2,
                   "judge": 101}[part]


def _member_prompts(part: str, prompts: list) -> list:
    """The training prompts of an RM: all for the first, each further member without one training frame."""
    if part in ("reward_model_1", "reward_model_2"):
        left_out = sorted({p.meta["frame"] for p in prompts})[RM_MEMBERS.index(part) - 1]
        return [p for p in prompts if p.meta["frame"] != left_out]
    return prompts


def _train_part(part: str, root: str, cfg: ToyWorldConfig, trainer: str = "saferl") -> float:
    """Train and save one model into `root/part`, whose tokenizer is there already (runs in a worker process
    or in this one), with the hand-written loop or (`trainer="trl"`) TRL's SFTTrainer and transformers'
    Trainer carrying SafeRL's batches and heads (`saferl.sft_batched`)."""
    configure_process()
    from transformers import AutoTokenizer

    from saferl.sft import train_causal_lm, train_regression
    from saferl.sft_batched import train_causal_lm_trl, train_regression_hf

    start = time.monotonic()
    tok = AutoTokenizer.from_pretrained(Path(root) / part)
    prompts = world.make_prompts("train")
    seed = _part_seed(part, cfg.seed)
    sft: SFTConfig = getattr(cfg, "reward_model_sft" if part in RM_MEMBERS else f"{part}_sft")
    common = dict(pad_id=tok.pad_token_id, steps=sft.steps, batch_size=sft.batch_size, lr=sft.lr,
                  warmup_steps=sft.warmup_steps, seed=seed, label=part)
    hf_args = {k: v for k, v in common.items() if k != "label"}
    if part in RM_MEMBERS:
        model = new_model(cfg.reward_model, tok, head="score", seed=seed)
        rm_examples = _rm_examples(tok, _member_prompts(part, prompts), seed, cfg.perturbations)
        pairs = dict(pair_weight=1.0 if cfg.perturbations else 0.0, group_size=6 + cfg.perturbations)
        if trainer == "trl":
            train_regression_hf(model, rm_examples, **pairs, **hf_args)
        else:
            train_regression(model, rm_examples, **pairs, **common)
    else:
        shape = {"policy": cfg.policy, "guard": cfg.guard, "judge": cfg.judge}[part]
        model = new_model(shape, tok, head="lm", seed=seed)
        examples = (_policy_examples(tok, cfg) if part == "policy"
                    else _guard_examples(tok, prompts, cfg.perturbations, seed))
        if trainer == "trl":
            hf_args.pop("pad_id")
            train_causal_lm_trl(model, tok, examples, share_prefix=part != "policy", **hf_args)
        else:
            train_causal_lm(model, examples, share_prefix=part != "policy", **common)
    if part not in RM_MEMBERS:  # decoding defaults for plain `generate` / vLLM: stop at <|im_end|>
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(Path(root) / part)
    return time.monotonic() - start


def _train_parts(parts: tuple[str, ...], root: str, cfg: ToyWorldConfig,
                 trainer: str = "saferl") -> dict[str, float]:
    return {part: _train_part(part, root, cfg, trainer) for part in parts}


def _make_tokenizers(root: Path, cfg: ToyWorldConfig) -> None:
    from saferl.guard.templates import GUARD_CHAT_TEMPLATE, moderation_messages
    from saferl.toyworld.tokenizer import train_bpe_tokenizer

    # The guard instruction is in the corpus too, so its words become whole tokens (shorter guard prompts).
    probe = train_bpe_tokenizer(world.corpus_texts()[:200], 300)
    probe.chat_template = GUARD_CHAT_TEMPLATE
    p = world.make_prompts("train")[0]
    instructions = [probe.apply_chat_template(moderation_messages(p.messages, r), tokenize=False)
                    for r in (None, "ok")] * 50
    tok = train_bpe_tokenizer(world.corpus_texts() + instructions, cfg.vocab_size)
    for part in ("policy", "reward_model"):
        tok.save_pretrained(root / part)
    tok.chat_template = GUARD_CHAT_TEMPLATE
    tok.save_pretrained(root / "guard")


def worker_pool() -> Any:
    """One spawned worker process, for the second core. It filters its output as this process does
    (`saferl.quiet`): a spawned interpreter's own streams would print the libraries' harmless lines (saving
    bars, DeepSpeed's CPU notice) straight to the terminal."""
    from saferl.quiet import is_quiet, quiet_output

    return multiprocessing.get_context("spawn").Pool(1, initializer=quiet_output if is_quiet() else None)


def _train_and_evaluate(root: Path, cfg: ToyWorldConfig, trainer: str,
                        stream_guard: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """Train the three models into `root` and measure them on the held-out prompts, in two processes: the
    guard, its evaluation and (`stream_guard`) the Stream guard here; the policy, the RM and their evaluation
    in the worker. Seconds per model, and the metrics in `evaluate.evaluate_world`'s order."""
    from saferl.toyworld.evaluate import evaluate_world_guard
    from saferl.toyworld.stream import build_toy_stream_guard

    start = time.monotonic()
    with worker_pool() as pool:
        other = pool.apply_async(_train_and_evaluate_models, (str(root), cfg, trainer))
        times = _train_parts(("guard",), str(root), cfg, trainer)
        guard_metrics = evaluate_world_guard(ToyWorldPaths(root))
        if stream_guard:
            stream_start = time.monotonic()
            build_toy_stream_guard(root)
            times["stream_guard"] = time.monotonic() - stream_start
        here = time.monotonic() - start
        model_times, model_metrics, there = other.get()
    print(f"[toyworld] this process's side (guard{', Stream guard' if stream_guard else ''}) took {here:.0f}s, "
          f"the worker's (policy, RM) {there:.0f}s", flush=True)
    return {**times, **model_times}, {**guard_metrics, **model_metrics}


def _train_and_evaluate_models(root: str, cfg: ToyWorldConfig,
                               trainer: str) -> tuple[dict[str, float], dict[str, float], float]:
    """The worker's half of `_train_and_evaluate`: the policy, then the RM, then their held-out metrics; and
    the seconds it took."""
    from saferl.toyworld.evaluate import evaluate_world_models

    start = time.monotonic()
    times = _train_parts(("policy", "reward_model"), root, cfg, trainer)
    metrics = evaluate_world_models(ToyWorldPaths(Path(root)), cfg.seed)
    return times, metrics, time.monotonic() - start


def build(cfg: ToyWorldConfig, trainer: str = "saferl", *, stream_guard: bool = False) -> ToyWorldPaths:
    """Build the world from scratch into the cache (see module docstring), after any other process building
    it (`build_lock`). Prints progress and metrics; raises ValueError, naming each missed metric and its
    target, when the world misses its quality targets. `trainer` (`TRAINERS`): "trl" trains the three models
    through `saferl.sft_batched`, into a key of its own. `stream_guard`: train the world's Stream guard too,
    on the core that would otherwise wait for the RM (`stream.ensure_toy_stream` builds it on first use
    otherwise)."""
    with build_lock(toyworld_paths(cfg, trainer).root):
        return _build(cfg, trainer, stream_guard)


def _build(cfg: ToyWorldConfig, trainer: str, stream_guard: bool) -> ToyWorldPaths:
    """`build` under the lock."""
    if trainer not in TRAINERS:
        raise ValueError(f"unknown toy world trainer {trainer!r}; expected one of {TRAINERS}")
    configure_process()
    from saferl.data import write_prompts
    from saferl.toyworld.evaluate import check_targets, report_world

    paths = toyworld_paths(cfg, trainer)
    tmp = paths.root.with_name(paths.root.name + f".tmp{multiprocessing.current_process().pid}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.monotonic()
    print(f"[toyworld] building {paths.root} (config key {world_key(cfg, trainer)}, trainer {trainer})",
          flush=True)
    write_prompts(tmp / "train.jsonl", world.make_prompts("train"))
    write_prompts(tmp / "heldout.jsonl", world.make_prompts("heldout"))
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    _make_tokenizers(tmp, cfg)
    times, metrics = _train_and_evaluate(tmp, cfg, trainer, stream_guard)
    print(f"[toyworld] models trained and evaluated on held-out prompts in {time.monotonic() - start:.0f}s "
          f"(training: {', '.join(f'{k} {v:.0f}s' for k, v in times.items())})", flush=True)
    metrics = report_world(metrics)
    metrics["build_seconds"] = round(time.monotonic() - start, 1)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(paths.root, ignore_errors=True)
    tmp.rename(paths.root)
    print(f"[toyworld] done in {metrics['build_seconds']:.0f}s -> {paths.root}", flush=True)
    check_targets(metrics, str(paths.root))
    return paths


def build_extras(paths: ToyWorldPaths, cfg: ToyWorldConfig, trainer: str = "saferl") -> None:
    """Train the judge and the two further RMs of a built world (next to its parts, each written under a
    temporary name and renamed when complete), evaluate them on the held-out prompts, then write extras.json.
    Targets as `build`: a miss raises after extras.json is written (kept for inspection)."""
    configure_process()
    from transformers import AutoTokenizer

    from saferl.toyworld.evaluate import EXTRA_TARGETS, check_targets, evaluate_extras

    start = time.monotonic()
    print(f"[toyworld] building the judge and the RM ensemble of {paths.root} (first use)", flush=True)
    tmp = paths.root / f"extras.tmp{multiprocessing.current_process().pid}"
    shutil.rmtree(tmp, ignore_errors=True)
    for part, source in (("judge", "guard"), ("reward_model_1", "reward_model"), ("reward_model_2", "reward_model")):
        AutoTokenizer.from_pretrained(paths.part(source)).save_pretrained(tmp / part)
    with worker_pool() as pool:
        other = pool.apply_async(_train_parts, (("reward_model_1", "reward_model_2"), str(tmp), cfg, trainer))
        times = {**_train_parts(("judge",), str(tmp), cfg, trainer), **other.get()}
    for part in EXTRA_PARTS:
        shutil.rmtree(paths.root / part, ignore_errors=True)
        (tmp / part).rename(paths.root / part)
    tmp.rmdir()
    metrics = evaluate_extras(paths, RM_MEMBERS)
    metrics["build_seconds"] = round(time.monotonic() - start, 1)
    print(f"[toyworld] extras trained ({', '.join(f'{k} {v:.0f}s' for k, v in times.items())}) and evaluated "
          f"in {metrics['build_seconds']:.0f}s", flush=True)
    (paths.root / "extras.json").write_text(json.dumps(metrics, indent=2))
    check_targets(metrics, str(paths.root), EXTRA_TARGETS)
