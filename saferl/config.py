"""The one config schema: every default of a SafeRL run lives in these dataclasses.

`load_config(path, overrides)` merges a YAML file and `key=value` overrides onto the schema with OmegaConf.
Unknown keys fail with their dotted name and the closest valid keys; wrong types fail with the key and the
expected type; choices, ranges and relations between keys are checked by `saferl.config_checks`. Classes
elsewhere receive plain arguments taken from here, never the config object.

Model references are paths, hub ids, or `toyworld:<part>` (policy, guard, reward_model, train, heldout),
which resolve to the embedded toy world built offline by `saferl toyworld build`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from saferl.config_checks import CHOICES, ConfigError, check_choices, check_keys, check_ranges, schema_keys
from saferl.types import SafetyPolicy


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
    # Perturbed responses per training prompt in the guard, judge and RM data (world.PERTURBATIONS: the text RL
    # finds in judges that saw only clean answers); 0 builds those judges on clean responses only.
    perturbations: int = 4
    policy: ModelShape = field(default_factory=ModelShape)
    guard: ModelShape = field(default_factory=lambda: ModelShape(num_layers=2))
    # The independent judge (eval.judge): a guard twice as deep, with its own seed and perturbation draws.
    judge: ModelShape = field(default_factory=ModelShape)
    # Shape of every RM of the ensemble (reward_model, reward_model_1, reward_model_2).
    reward_model: ModelShape = field(default_factory=lambda: ModelShape(num_layers=2))
    # 400 steps. Held-out answers garbled at temperature 1 (the world's own evaluation, seed 0): 0.36 after 200
    # steps, 0.12 after 400, 0.05 after 1200; but RL from the 1200-step policy left benign refusal at 0.08-0.16
    # on the held-out frames (bound 0.03) and raised its garbling (experiments/2026-12-01-reward-hacking, round 3).
    policy_sft: SFTConfig = field(default_factory=SFTConfig)
    guard_sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=350, lr=3e-3))
    judge_sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=350, lr=3e-3))
    # The RMs: 600 steps of 40 answers (about 4 prompts' groups) with the pairwise term; 300 x 32 sufficed
    # before the perturbations (build 4).
    reward_model_sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=600, batch_size=40, lr=2e-3))


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
    # The roles' resources are reserved up front as one Ray placement group, one bundle per actor holding its
    # CPUs and GPUs (an actor that asks for neither has none). How the bundles go onto nodes: PACK (as few
    # nodes as possible; the default: fractional CPU shares pack onto small nodes), SPREAD (as many nodes as
    # possible), STRICT_PACK (all on one node), STRICT_SPREAD (each bundle on a node of its own).
    placement_strategy: str = "PACK"
    # Seconds to wait for the whole group before failing with the bundles that could not be placed and each
    # node's free CPUs and GPUs; raise it where an autoscaler adds nodes on demand (minutes).
    placement_timeout_s: float = 30.0


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
    # Further RMs scored beside `model` in the same actors (an ensemble; hf | vllm only): every member scores
    # every answer and reward.rules.ensemble aggregates them into H. []: `model` alone.
    ensemble: list[str] = field(default_factory=list)
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
    # Caps, strict/loose Controversial, unparsable verdicts, the RM ensemble's aggregate and the fluency gate:
    # saferl.types.SafetyPolicy, documented there (keys reward.rules.unsafe_cap, .refusal_cap,
    # .controversial_is_unsafe, .unparsable, .category_caps, .ensemble, .ensemble_k, .fluency_min_logprob,
    # .implausible_cap).
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
    # Weight of the policy's token entropy in the loss: > 0 a bonus (more exploration), < 0 a penalty (a
    # sharper policy: fewer sampling slips at temperature 1), 0 off.
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
    # The weight sync streams the weights to the engines in buckets of at most this many MiB (an engine
    # module larger than that, e.g. a 151k-token embedding, travels alone); about one bucket is the extra
    # memory a sync takes (benchmarks/results/weight_sync.md).
    sync_bucket_mb: int = 256


@dataclass
class EvalConfig:
    prompts: str = "toyworld:heldout"
    every: int = 0  # 0: only before and after training
    samples_per_prompt: int = 2
    seed: int = 1234
    max_prompts: int = 0  # 0: all
    # An independent guard judging held-out evaluation (and the monitor's samples), reported as judge_*
    # beside the reward guard: a GuardConfig (any Gen-format guard; vllm | hf | http | openai). A partial
    # mapping takes the rest from GuardConfig's defaults, not from this run's guard section. null: no judge.
    judge: GuardConfig | None = None


@dataclass
class AlarmConfig:
    """Fires once, when `metric` has been at or above `threshold` for `patience` monitored steps in a row."""

    # monitor/implausible_advantage | monitor/probe_implausible_advantage | monitor/judge_disagreement |
    # monitor/ref_logprob_drop; null: no alarm
    metric: str | None = None
    threshold: float = 0.0
    patience: int = 3
    # The metric compared is the mean of its last `window` monitored values (1: each step's own value); a
    # statistic of one step's few answers is noisy.
    window: int = 1
    # warn: a loud line and monitor/alarm=1 from then on; checkpoint: also saves alarm_step_<N>; stop: ends
    # the run there (the final evaluation and checkpoint still run; eval.json records stopped_by_alarm).
    action: str = "warn"


@dataclass
class MonitorConfig:
    """The reward-hacking early warning (saferl.eval.monitor), logged as monitor/*; it only reads."""

    sample: int = 0  # trained rollouts per step (whole groups) judged again by eval.judge and truth; 0: off
    # An answer with a token whose log-prob under the starting policy is below this is implausible to the
    # monitor (monitor/implausible_*; the same statistic as the fluency gate, reward.rules.fluency_min_logprob,
    # which may be off while the monitor watches).
    implausible_logprob: float = -4.0
    # The tail probe: each step the prompts of the monitor's sample are sampled again, rollout.samples_per_prompt
    # answers each, at this top-p (same temperature), from the just-updated policy, and scored by the run's own
    # reward; never trained on. monitor/probe_implausible_advantage is the mean group advantage the reward gives
    # the probe's implausible answers: the incentive to garble even while rollout.top_p keeps the training
    # rollouts out of the tail. null: no probe.
    probe_top_p: float | None = None
    alarm: AlarmConfig = field(default_factory=AlarmConfig)


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
    # false: the driver drops the known-harmless lines of vLLM, Ray, DeepSpeed and torch and per-actor
    # weight-loading bars (saferl.quiet.HARMLESS lists each, with why); true (or -v): everything is shown.
    verbose: bool = False


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
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SCHEMA_KEYS = schema_keys(SafeRLConfig)
LEAF_KEYS = [k for k, t in SCHEMA_KEYS.items() if not dataclasses.is_dataclass(t)]
NULLABLE_KEYS = {k for k in LEAF_KEYS if "None" in str(SCHEMA_KEYS[k])}
OPTIONAL_SECTION_KEYS = tuple(k for k in LEAF_KEYS if any(key.startswith(k + ".") for key in SCHEMA_KEYS))
CHOICES_KEYS = tuple(CHOICES)


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key=value (e.g. trainer.lr=1e-4)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"Cannot parse overrides {overrides}: {e}") from e


def dotted_value(cfg: SafeRLConfig, key: str) -> Any:
    """The value at a dotted key; None under an optional section that is off (null)."""
    node: Any = cfg
    for part in key.split("."):
        if node is None:
            return None
        node = getattr(node, part)
    return node


def read_sources(path: str | Path | None, overrides: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
    """The YAML file's and the overrides' raw mappings, as (where from, nested dict), in merge order; not yet
    checked against the schema. `saferl config show` reads them to tell each value's source."""
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
    return sources


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SafeRLConfig:
    """Schema defaults <- YAML file <- `key=value` overrides, validated. Returns a typed SafeRLConfig."""
    merged: DictConfig = OmegaConf.structured(SafeRLConfig)
    for source, raw in read_sources(path, overrides):
        check_keys(raw, source, SCHEMA_KEYS)
        try:
            merged = OmegaConf.merge(merged, raw)  # type: ignore[assignment]
        except ValidationError as e:
            key = e.full_key or "?"
            expected = SCHEMA_KEYS.get(str(key)) or SCHEMA_KEYS.get(str(key).rsplit(".", 1)[0], "?")
            raise ConfigError(
                f"Config key '{key}' (from {source}) has the wrong type: expected {expected}, "
                f"got {e.value!r}"
            ) from e
        except ConfigKeyError as e:  # belt and braces: check_keys should have caught it
            raise ConfigError(f"Unknown config key '{e.full_key}' (from {source})") from e
    # Choices before to_object: SafetyPolicy checks its own fields on creation.
    check_choices({key: OmegaConf.select(merged, key) for key in (*CHOICES_KEYS, *OPTIONAL_SECTION_KEYS)})
    try:
        cfg: SafeRLConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ValueError as e:  # a dataclass's own check (SafetyPolicy: unknown category_caps), naming its key
        raise ConfigError(str(e)) from e
    check_ranges({key: dotted_value(cfg, key) for key in LEAF_KEYS}, NULLABLE_KEYS)
    return cfg


def to_yaml(cfg: SafeRLConfig) -> str:
    """The resolved config as YAML, written into every run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
