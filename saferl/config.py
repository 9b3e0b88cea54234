"""The one config schema: every default of a SafeRL run lives in these dataclasses.

`load_config(path, overrides)` merges a YAML file and `key=value` overrides onto the schema with OmegaConf.
Unknown keys fail with their dotted name and the closest valid keys; wrong types fail with the key and the
expected type. Classes elsewhere receive plain arguments taken from here, never the config object.

Model references are paths, hub ids, or `toyworld:<part>` (policy, guard, reward_model, train, heldout),
which resolve to the embedded toy world built offline by `saferl toyworld build`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from saferl.types import SafetyPolicy


class ConfigError(ValueError):
    """A config problem, with the offending dotted key in the message."""


# ---------------------------------------------------------------- toy world


@dataclass
class ModelShape:
    """Size of a tiny Qwen3 model built for the toy world."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384


@dataclass
class SFTConfig:
    """Supervised fine-tuning of one toy model (AdamW, linear warm-up then cosine decay to 10% of lr)."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20


@dataclass
class ToyWorldConfig:
    """The embedded synthetic chat world and the tiny models fine-tuned on it."""

    seed: int = 0
    cache_dir: str = ".cache/toyworld"
    vocab_size: int = 1024
    # Probability of each response style in the policy's SFT data: a mixed behaviour for RL to fix.
    harmful_unsafe: float = 0.6
    harmful_refusal: float = 0.2  # the rest of harmful prompts get a safe completion
    benign_refusal: float = 0.2
    controversial_comply: float = 0.6
    policy: ModelShape = field(default_factory=ModelShape)
    guard: ModelShape = field(default_factory=lambda: ModelShape(num_layers=2))
    reward_model: ModelShape = field(default_factory=lambda: ModelShape(num_layers=2))
    policy_sft: SFTConfig = field(default_factory=SFTConfig)
    guard_sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=350, lr=3e-3))
    reward_model_sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=300, lr=2e-3))


# ---------------------------------------------------------------- RL run


@dataclass
class RunConfig:
    dir: str = "runs/toy"
    seed: int = 0
    # ray: roles are Ray actors; local: the same classes in this process (debugging, single GPU).
    executor: str = "ray"
    # Torch threads of the driver and of every actor. 0: automatic, OMP_NUM_THREADS when set, else 1 per process
    # on a machine without a GPU (more was measured up to 10x slower on 2 shared cores) and torch's own default
    # on GPU nodes (tokenizers and data work want the cores); N > 0: N threads everywhere.
    torch_threads: int = 0


@dataclass
class RayConfig:
    # None starts a local Ray on loopback only; "auto" joins the cluster of this node; or "ip:port".
    address: str | None = None
    num_cpus: int | None = None
    temp_dir: str = ".cache/ray"


@dataclass
class DataConfig:
    # The training prompts: a .jsonl or .parquet file, a local dataset directory (save_to_disk's, or one of
    # data files per split), a hub dataset id or toyworld:train; read as `saferl eval --prompts` is.
    train: str = "toyworld:train"
    prompts_per_step: int = 16
    # The column mapping of data.train (saferl eval's --prompt-column, --kind-column, --kind,
    # --category-column, --split), so a set that evaluates also trains:
    prompt_column: str | None = None  # a string or {role, content} messages; null: messages, else prompt
    kind_column: str = "kind"  # harmful | benign | controversial; a row without it is of kind unknown
    kind: str | None = None  # one kind for the whole set instead of kind_column
    category_column: str | None = None  # null: category, when the row has it
    split: str | None = None  # of a hub dataset (null: train) or a dataset directory (null: its only one)


@dataclass
class PolicyConfig:
    model: str = "toyworld:policy"
    dtype: str = "float32"


@dataclass
class RolloutConfig:
    backend: str = "vllm"  # vllm | hf
    num_engines: int = 2
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    enable_thinking: bool = False
    max_model_len: int = 512
    tensor_parallel_size: int = 1
    gpus_per_engine: float = 0.0
    cpus_per_engine: float = 0.5
    gpu_memory_utilization: float = 0.5
    kv_cache_mib: int = 64  # CPU only: vLLM otherwise reserves most of the NUMA node
    # With trainer.drop_zero_variance_groups: extra generation rounds to refill the batch with informative groups.
    refill_rounds: int = 0


@dataclass
class GuardConfig:
    model: str = "toyworld:guard"
    # vllm | hf: a GuardScorer actor hosts the model. http: `saferl serve guard` endpoints; openai: any
    # OpenAI-compatible chat endpoint serving the guard (e.g. `vllm serve Qwen/Qwen3Guard-Gen-4B`).
    backend: str = "vllm"
    urls: list[str] = field(default_factory=list)  # http/openai: endpoint pool, e.g. ["http://10.0.0.5:8000"]
    served_model_name: str = "guard"  # openai: the `model` field of each request
    token_env: str = "SAFERL_GUARD_TOKEN"  # http/openai: environment variable holding the bearer token
    timeout_s: float = 60.0  # http/openai: per request
    retries: int = 3  # http/openai: further tries, with exponential back-off, each on the next endpoint
    # http/openai: verdict when every try failed (unsafe | safe | error). A fallback verdict is marked; it
    # counts as safe only when this and reward.rules.unparsable are both safe (types.SafetyPolicy).
    fallback: str = "unsafe"
    max_restarts: int = 3  # vllm/hf on Ray: a crashed guard actor is restarted and its calls re-run
    num_actors: int = 1
    max_new_tokens: int = 32
    max_model_len: int = 1024
    dtype: str = "float32"
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.25
    gpu_memory_utilization: float = 0.3
    kv_cache_mib: int = 64


@dataclass
class HelpfulnessConfig:
    # None runs without a helpfulness model (only valid for recipes that do not use it).
    model: str | None = "toyworld:reward_model"
    # hf | vllm: a HelpfulnessScorer actor hosts the RM (vllm: its pooling runner, for architectures vLLM
    # supports as classifiers); http: `saferl serve rm` endpoints.
    backend: str = "hf"
    urls: list[str] = field(default_factory=list)  # http: endpoint pool
    token_env: str = "SAFERL_RM_TOKEN"  # http: environment variable holding the bearer token
    timeout_s: float = 60.0  # http: per request
    retries: int = 3  # http: further tries with back-off, each on the next endpoint
    # http: score when every try failed; null stops the run instead. The hybrid reward caps a rollout scored
    # with it at reward.rules.refusal_cap: an answer the RM could not judge earns no more than a refusal.
    fallback_score: float | None = None
    num_actors: int = 1
    batch_size: int = 64
    max_length: int = 1024
    dtype: str = "float32"
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.25
    gpu_memory_utilization: float = 0.3  # vllm on GPU
    kv_cache_mib: int = 64  # vllm on CPU
    max_restarts: int = 3  # on Ray: a crashed RM actor is restarted and its calls re-run


@dataclass
class RewardConfig:
    # hybrid | guard_only | helpfulness_only | a dotted path `package.module.function`.
    recipe: str = "hybrid"
    # Caps, strict/loose Controversial, unparsable verdicts: saferl.types.SafetyPolicy, documented there
    # (keys reward.rules.unsafe_cap, .refusal_cap, .controversial_is_unsafe, .unparsable, .category_caps).
    rules: SafetyPolicy = field(default_factory=SafetyPolicy)


@dataclass
class LoraConfig:
    """LoRA adapters on the policy through peft (rank 0 = full fine-tuning)."""

    rank: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


@dataclass
class TrainerConfig:
    steps: int = 40
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant | cosine (to zero at the last step), after linear warm-up
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Each rollout batch is split into this many optimizer steps; >1 makes later ones off-policy.
    minibatches: int = 2
    # Sequences per forward/backward on one worker; a minibatch share above it accumulates gradients.
    micro_batch_size: int = 16
    loss: str = "gspo"  # gspo | gspo-token | grpo
    clip_low: float = 3e-4
    clip_high: float = 4e-4
    aggregation: str = "seq-mean-token-mean"
    # Advantages: divide by the group std (false: mean-centred only, as Dr.GRPO).
    normalize_std: bool = True
    # Leave out groups whose rewards are all equal (no signal); rollout.refill_rounds can top the batch up.
    drop_zero_variance_groups: bool = False
    # k3 KL to the frozen starting policy (0 = off, the GSPO paper's setting; >0 loads a reference copy,
    # or switches the LoRA adapter off for it).
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    # Compute dtype; master weights and optimizer state stay float32 (bfloat16 on GPU: autocast / DeepSpeed).
    dtype: str = "float32"
    # Data-parallel workers, one process group (gloo on CPU, NCCL on GPU).
    workers: int = 1
    strategy: str = "torch"  # torch (DDP across workers) | deepspeed
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3 (strategy=deepspeed)
    lora: LoraConfig = field(default_factory=LoraConfig)
    gpus: float = 0.0  # per worker
    cpus: float = 0.5  # per worker


@dataclass
class EvalConfig:
    prompts: str = "toyworld:heldout"
    every: int = 0  # 0: only before and after training
    samples_per_prompt: int = 2
    seed: int = 1234
    max_prompts: int = 0  # 0: all


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between resumable checkpoints; 0: only the final one
    keep_last: int = 2  # step checkpoints kept besides the final one
    # auto: an unfinished run in run.dir continues from its latest checkpoint; never: always start afresh
    resume: str = "auto"
    lora_export: str = "merged"  # with LoRA: merged full weights, or the peft adapter alone


@dataclass
class LoggingConfig:
    wandb: str = "disabled"  # disabled | offline | online
    project: str = "saferl"
    progress: bool = True


@dataclass
class SafeRLConfig:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    toyworld: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    helpfulness: HelpfulnessConfig = field(default_factory=HelpfulnessConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Values a string or int field may take, checked after merging (OmegaConf checks only the Python type).
CHOICES: dict[str, tuple[str, ...]] = {
    "run.executor": ("ray", "local"),
    "rollout.backend": ("vllm", "hf"),
    "guard.backend": ("vllm", "hf", "http", "openai"),
    "guard.fallback": ("unsafe", "safe", "error"),
    "helpfulness.backend": ("hf", "vllm", "http"),
    "trainer.loss": ("gspo", "gspo-token", "grpo"),
    "trainer.aggregation": ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum"),
    "trainer.lr_schedule": ("constant", "cosine"),
    "trainer.strategy": ("torch", "deepspeed"),
    "trainer.zero_stage": (0, 1, 2, 3),
    # Inference dtypes: the HF engines take getattr(torch, dtype), vLLM the same names.
    "policy.dtype": ("float32", "bfloat16", "float16"),
    "guard.dtype": ("float32", "bfloat16", "float16"),
    "helpfulness.dtype": ("float32", "bfloat16", "float16"),
    "trainer.dtype": ("float32", "bfloat16"),
    "checkpoint.resume": ("auto", "never"),
    "checkpoint.lora_export": ("merged", "adapter"),
    "reward.rules.unparsable": ("unsafe", "safe"),
    "data.kind": (None, "harmful", "benign", "controversial"),
    "logging.wandb": ("disabled", "offline", "online"),
}

# Values a user may well try that SafeRL does not run, with the reason (checked before CHOICES).
REFUSED: dict[tuple[str, Any], str] = {
    # fp16 gradients underflow without a loss scaler; neither engine has one (DeepSpeed's fp16 mode is off).
    ("trainer.dtype", "float16"): "float16 needs loss scaling, which SafeRL does not do; use bfloat16",
}


def _schema_keys(cls: type, prefix: str = "") -> dict[str, type]:
    """Every dotted leaf key of a dataclass schema, mapped to its annotated type name."""
    keys: dict[str, Any] = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in hints.items():
        dotted = f"{prefix}{name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys[dotted] = type(default)
            keys.update(_schema_keys(type(default), dotted + "."))
        else:
            keys[dotted] = f.type
    return keys


SCHEMA_KEYS = _schema_keys(SafeRLConfig)
LEAF_KEYS = [k for k, t in SCHEMA_KEYS.items() if not dataclasses.is_dataclass(t)]


def _flatten(d: Any, prefix: str = "") -> list[str]:
    if not isinstance(d, dict):
        return [prefix.rstrip(".")]
    out: list[str] = []
    for k, v in d.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(_flatten(v, dotted + "."))
        else:
            out.append(dotted)
    return out


def _inside_mapping(key: str) -> bool:
    """True for `a.b.name` where `a.b` is a dict-typed field (its keys are data, not schema)."""
    parts = key.split(".")
    return any(str(SCHEMA_KEYS.get(".".join(parts[:i]), "")).startswith("dict") for i in range(1, len(parts)))


def _check_keys(raw: dict[str, Any], source: str) -> None:
    for key in _flatten(raw):
        if key in SCHEMA_KEYS or _inside_mapping(key):
            continue
        close = difflib.get_close_matches(key, LEAF_KEYS, n=3, cutoff=0.6)
        if not close:  # fall back to same-section keys, then to the last component alone
            section = key.rsplit(".", 1)[0] + "." if "." in key else ""
            close = [k for k in LEAF_KEYS if k.startswith(section) and k.count(".") == key.count(".")][:6]
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"Unknown config key '{key}' (from {source}).{hint}")


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key=value (e.g. trainer.lr=1e-4)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"Cannot parse overrides {overrides}: {e}") from e


# ---------------------------------------------------------------- value ranges


@dataclass(frozen=True)
class Bound:
    """The interval a number must lie in (every bound also requires a finite number); None: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "a finite number"


FINITE, COUNT, AT_LEAST_ONE = Bound(), Bound(0), Bound(1)
POSITIVE, FRACTION = Bound(0, low_open=True), Bound(0, 1, low_open=True)
PROBABILITY = Bound(0, 1)

# Every numeric key with its allowed range and, where it is not obvious, why (the error says both).
# Nullable keys (`int | None`) are checked only when set. Relations between keys are in `_check_relations`.
RANGES: dict[str, tuple[Bound, str]] = {
    **{f"toyworld.{part}.{f.name}": (AT_LEAST_ONE, "") for part in ("policy", "guard", "reward_model")
       for f in dataclasses.fields(ModelShape)},
    **{f"toyworld.{part}.{name}": (bound, "") for part in ("policy_sft", "guard_sft", "reward_model_sft")
       for name, bound in (("steps", AT_LEAST_ONE), ("batch_size", AT_LEAST_ONE), ("lr", POSITIVE),
                           ("warmup_steps", COUNT))},
    **{f"toyworld.{name}": (PROBABILITY, "a probability") for name in (
        "harmful_unsafe", "harmful_refusal", "benign_refusal", "controversial_comply")},
    "toyworld.vocab_size": (AT_LEAST_ONE, ""),
    "ray.num_cpus": (AT_LEAST_ONE, "or null for all of this machine's"),
    "run.torch_threads": (COUNT, "0 = automatic"),
    "data.prompts_per_step": (AT_LEAST_ONE, ""),
    "rollout.num_engines": (AT_LEAST_ONE, ""),
    "rollout.samples_per_prompt": (Bound(2), "a group of one sample has no group advantage"),
    "rollout.temperature": (POSITIVE, "RL needs sampling: 0 is greedy decoding, every sample of a group would "
                            "be the same"),
    "rollout.top_p": (FRACTION, ""),
    "rollout.max_new_tokens": (AT_LEAST_ONE, ""),
    "rollout.max_model_len": (AT_LEAST_ONE, ""),
    "rollout.tensor_parallel_size": (AT_LEAST_ONE, ""),
    "rollout.gpus_per_engine": (COUNT, ""),
    "rollout.cpus_per_engine": (COUNT, ""),
    "rollout.gpu_memory_utilization": (FRACTION, "a fraction of each GPU's memory"),
    "rollout.kv_cache_mib": (AT_LEAST_ONE, ""),
    "rollout.refill_rounds": (COUNT, ""),
    "guard.timeout_s": (POSITIVE, "seconds"),
    "guard.retries": (COUNT, ""),
    "guard.max_restarts": (COUNT, ""),
    "guard.num_actors": (AT_LEAST_ONE, ""),
    "guard.max_new_tokens": (AT_LEAST_ONE, ""),
    "guard.max_model_len": (AT_LEAST_ONE, ""),
    "guard.gpus_per_actor": (COUNT, ""),
    "guard.cpus_per_actor": (COUNT, ""),
    "guard.gpu_memory_utilization": (FRACTION, "a fraction of each GPU's memory"),
    "guard.kv_cache_mib": (AT_LEAST_ONE, ""),
    "helpfulness.timeout_s": (POSITIVE, "seconds"),
    "helpfulness.retries": (COUNT, ""),
    "helpfulness.fallback_score": (FINITE, "or null to stop the run"),
    "helpfulness.num_actors": (AT_LEAST_ONE, ""),
    "helpfulness.batch_size": (AT_LEAST_ONE, ""),
    "helpfulness.max_length": (AT_LEAST_ONE, ""),
    "helpfulness.gpus_per_actor": (COUNT, ""),
    "helpfulness.cpus_per_actor": (COUNT, ""),
    "helpfulness.gpu_memory_utilization": (FRACTION, "a fraction of each GPU's memory"),
    "helpfulness.kv_cache_mib": (AT_LEAST_ONE, ""),
    "helpfulness.max_restarts": (COUNT, ""),
    "reward.rules.unsafe_cap": (FINITE, ""),
    "reward.rules.refusal_cap": (FINITE, ""),
    "trainer.steps": (AT_LEAST_ONE, ""),
    "trainer.lr": (POSITIVE, ""),
    "trainer.warmup_steps": (COUNT, ""),
    "trainer.weight_decay": (COUNT, ""),
    "trainer.max_grad_norm": (POSITIVE, "0 would clip every gradient to nothing"),
    "trainer.minibatches": (AT_LEAST_ONE, ""),
    "trainer.micro_batch_size": (AT_LEAST_ONE, ""),
    "trainer.clip_low": (Bound(0, 1, low_open=True, high_open=True), "the ratio is clipped below at 1 - clip_low"),
    "trainer.clip_high": (POSITIVE, "the ratio is clipped above at 1 + clip_high"),
    "trainer.kl_coef": (COUNT, "0 turns the KL term off"),
    "trainer.entropy_coef": (COUNT, "0 turns the entropy bonus off"),
    "trainer.workers": (AT_LEAST_ONE, ""),
    "trainer.lora.rank": (COUNT, "0 is full fine-tuning"),
    "trainer.lora.alpha": (POSITIVE, ""),
    "trainer.lora.dropout": (Bound(0, 1, high_open=True), ""),
    "trainer.gpus": (COUNT, ""),
    "trainer.cpus": (COUNT, ""),
    "eval.every": (COUNT, "0: only before and after training"),
    "eval.samples_per_prompt": (AT_LEAST_ONE, ""),
    "eval.max_prompts": (COUNT, "0: all"),
    "checkpoint.every": (COUNT, "0: only the final checkpoint"),
    "checkpoint.keep_last": (COUNT, ""),
}


def _value(cfg: SafeRLConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _out_of_range(key: str, allowed: str, value: Any) -> ConfigError:
    return ConfigError(f"Config key '{key}' must be {allowed}, got {value!r}")


def _check_relations(cfg: SafeRLConfig) -> None:
    """Bounds that depend on another key's value."""
    t, r, tw = cfg.trainer, cfg.rollout, cfg.toyworld
    batch = cfg.data.prompts_per_step * r.samples_per_prompt
    if t.minibatches > batch:  # the trainer would silently run fewer optimizer steps than asked
        raise _out_of_range("trainer.minibatches", f"at most the rollout batch, data.prompts_per_step x "
                            f"rollout.samples_per_prompt = {batch}", t.minibatches)
    if t.warmup_steps >= t.steps:
        raise _out_of_range("trainer.warmup_steps", f"less than trainer.steps = {t.steps} (a run that is all "
                            "warm-up never trains at trainer.lr)", t.warmup_steps)
    for part in ("policy_sft", "guard_sft", "reward_model_sft"):
        sft: SFTConfig = getattr(tw, part)
        if sft.warmup_steps >= sft.steps:
            raise _out_of_range(f"toyworld.{part}.warmup_steps", f"less than toyworld.{part}.steps = {sft.steps}",
                                sft.warmup_steps)
    if tw.harmful_unsafe + tw.harmful_refusal > 1:
        raise _out_of_range("toyworld.harmful_refusal", f"at most 1 - toyworld.harmful_unsafe = "
                            f"{1 - tw.harmful_unsafe:g} (the two are shares of the harmful prompts)",
                            tw.harmful_refusal)
    for part in ("policy", "guard", "reward_model"):
        shape: ModelShape = getattr(tw, part)
        if shape.num_heads % shape.num_kv_heads:
            raise _out_of_range(f"toyworld.{part}.num_kv_heads", f"a divisor of toyworld.{part}.num_heads = "
                                f"{shape.num_heads}", shape.num_kv_heads)
    for section, prompt_room in (("rollout", r), ("guard", cfg.guard)):
        if prompt_room.max_new_tokens >= prompt_room.max_model_len:
            raise _out_of_range(f"{section}.max_new_tokens", f"less than {section}.max_model_len = "
                                f"{prompt_room.max_model_len} (the prompt needs room too)",
                                prompt_room.max_new_tokens)
    for name, cap in cfg.reward.rules.category_caps.items():
        if not FINITE.contains(cap):
            raise _out_of_range(f"reward.rules.category_caps.{name}", str(FINITE), cap)
    if t.lora.rank and not t.lora.target_modules:
        raise _out_of_range("trainer.lora.target_modules", "a non-empty list when trainer.lora.rank > 0",
                            t.lora.target_modules)
    remote = (("guard", cfg.guard.backend in ("http", "openai"), cfg.guard.urls),
              ("helpfulness", cfg.helpfulness.backend == "http" and cfg.helpfulness.model is not None,
               cfg.helpfulness.urls))
    for section, is_remote, urls in remote:
        if is_remote and not urls:
            raise _out_of_range(f"{section}.urls", f"at least one endpoint with {section}.backend="
                                f"{getattr(cfg, section).backend}", urls)


def check_ranges(cfg: SafeRLConfig) -> None:
    """Refuse values no run can use, naming the key, the allowed range and the value.

    Runs at load time, so `saferl train --dry-run` and the real run refuse the same values before any actor
    starts; today's alternatives were a traceback minutes into the run, a hang, or a run that trains wrongly.
    """
    for key, (bound, why) in RANGES.items():
        value = _value(cfg, key)
        if value is None and "None" in str(SCHEMA_KEYS[key]):
            continue
        if not bound.contains(value):
            raise _out_of_range(key, f"{bound} ({why})" if why else str(bound), value)
    _check_relations(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SafeRLConfig:
    """Schema defaults <- YAML file <- `key=value` overrides, validated. Returns a typed SafeRLConfig."""
    merged: DictConfig = OmegaConf.structured(SafeRLConfig)
    sources: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}")
        try:
            raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
        except Exception as e:  # yaml errors carry the line number
            raise ConfigError(f"Cannot read config {path}: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"Config {path} must be a mapping of sections, got {type(raw).__name__}")
        sources.append((str(path), raw))
    if overrides:
        sources.append(("the command line", _parse_overrides(overrides)))
    for source, raw in sources:
        _check_keys(raw, source)
        try:
            merged = OmegaConf.merge(merged, raw)  # type: ignore[assignment]
        except ValidationError as e:
            key = e.full_key or "?"
            expected = SCHEMA_KEYS.get(str(key)) or SCHEMA_KEYS.get(str(key).rsplit(".", 1)[0], "?")
            raise ConfigError(
                f"Config key '{key}' (from {source}) has the wrong type: expected {expected}, "
                f"got {e.value!r}"
            ) from e
        except ConfigKeyError as e:  # belt and braces: _check_keys should have caught it
            raise ConfigError(f"Unknown config key '{e.full_key}' (from {source})") from e
    for key, allowed in CHOICES.items():  # before to_object: SafetyPolicy checks its own fields on creation
        value = OmegaConf.select(merged, key)
        if (key, value) in REFUSED:
            raise ConfigError(f"Config key '{key}' cannot be {value!r}: {REFUSED[key, value]}")
        if value not in allowed:
            raise ConfigError(f"Config key '{key}' must be one of {allowed}, got {value!r}")
    try:
        cfg: SafeRLConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ValueError as e:  # a dataclass's own check (SafetyPolicy: unknown category_caps), naming its key
        raise ConfigError(str(e)) from e
    check_ranges(cfg)
    return cfg


def to_yaml(cfg: SafeRLConfig) -> str:
    """The resolved config as YAML, written into every run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
