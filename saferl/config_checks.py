"""Checks of a config: unknown keys, allowed choices, refused values, numeric ranges, relations between keys.

Every check reads the config as dotted key -> value (`values`), or is handed the schema's dotted keys
(`schema_keys` of the dataclass, `check_keys`), so this module imports nothing of the schema in
`saferl.config` (whose `load_config` calls the checks); a range or choice for a key the schema lacks
is caught by the tests in tests/unit/test_config_ranges.py. Each error names the key, what is allowed and the
value, and runs at load time, so `saferl train --dry-run` and the real run refuse the same values before any
actor starts (the alternatives were a traceback minutes into a run, a hang, or a run that trains wrongly).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config problem, with the offending dotted key in the message."""


# ---------------------------------------------------------------- keys


def _optional_section(cls: type, name: str) -> type | None:
    """The dataclass `X` of a field annotated `X | None` (a section that is null when off), else None."""
    args = [a for a in typing.get_args(typing.get_type_hints(cls)[name]) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def schema_keys(cls: type, prefix: str = "") -> dict[str, type]:
    """Every dotted key of a dataclass schema, mapped to its annotated type name (a section: its class). An
    optional section (`eval.judge: GuardConfig | None`) is a nullable key whose fields are keys too."""
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys[dotted] = type(default)
            keys.update(schema_keys(type(default), dotted + "."))
        else:
            keys[dotted] = f.type
            if (section := _optional_section(cls, f.name)) is not None:
                keys.update(schema_keys(section, dotted + "."))
    return keys


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


def check_keys(raw: dict[str, Any], source: str, keys: Mapping[str, Any]) -> None:
    """Refuse a key of `raw` (a YAML file's or the overrides' nested mapping) that the schema's `keys` lack,
    naming the closest valid ones; the keys of a dict-typed field's value are data, not schema."""
    leaves = [k for k, t in keys.items() if not dataclasses.is_dataclass(t)]
    for key in _flatten(raw):
        parts = key.split(".")
        if key in keys or any(str(keys.get(".".join(parts[:i]), "")).startswith("dict")
                              for i in range(1, len(parts))):
            continue
        close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.6)
        if not close:  # fall back to same-section keys, then to the last component alone
            section = key.rsplit(".", 1)[0] + "." if "." in key else ""
            close = [k for k in leaves if k.startswith(section) and k.count(".") == key.count(".")][:6]
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"Unknown config key '{key}' (from {source}).{hint}")


# ---------------------------------------------------------------- values


# Values a string or int field may take, checked after merging (OmegaConf checks only the Python type).
CHOICES: dict[str, tuple[str, ...]] = {
    "run.executor": ("ray", "local"),
    "ray.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),  # Ray's own names
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
    "reward.rules.ensemble": ("mean", "min", "mean_minus_std"),
    "data.kind": (None, "harmful", "benign", "controversial"),
    "logging.wandb": ("disabled", "offline", "online"),
    # Monitor statistics where higher means more reward hacking (the alarm fires at or above its threshold).
    "monitor.alarm.metric": (None, "monitor/implausible_advantage", "monitor/probe_implausible_advantage",
                             "monitor/judge_disagreement", "monitor/ref_logprob_drop"),
    "monitor.alarm.action": ("warn", "checkpoint", "stop"),
}
# eval.judge is a GuardConfig: the guard's choices (and ranges, below) apply to it when it is set.
CHOICES.update({"eval.judge." + k.removeprefix("guard."): v for k, v in list(CHOICES.items())
                if k.startswith("guard.")})

# Values a user may well try that SafeRL does not run, with the reason (checked before CHOICES).
REFUSED: dict[tuple[str, Any], str] = {
    # fp16 gradients underflow without a loss scaler; neither engine has one (DeepSpeed's fp16 mode is off).
    ("trainer.dtype", "float16"): "float16 needs loss scaling, which SafeRL does not do; use bfloat16",
}


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

# The fields of saferl.config.ModelShape (a test checks that every one of them has a range).
MODEL_SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")

# Every numeric key with its allowed range and, where it is not obvious, why (the error says both).
# Nullable keys (`int | None`) are checked only when set. Relations between keys are in `_check_relations`.
RANGES: dict[str, tuple[Bound, str]] = {
    **{f"toyworld.{part}.{name}": (AT_LEAST_ONE, "") for part in ("policy", "guard", "judge", "reward_model")
       for name in MODEL_SHAPE_FIELDS},
    **{f"toyworld.{part}.{name}": (bound, "") for part in ("policy_sft", "guard_sft", "judge_sft",
                                                                       "reward_model_sft")
       for name, bound in (("steps", AT_LEAST_ONE), ("batch_size", AT_LEAST_ONE), ("lr", POSITIVE),
                           ("warmup_steps", COUNT))},
    **{f"toyworld.{name}": (PROBABILITY, "a probability") for name in (
        "harmful_unsafe", "harmful_refusal", "benign_refusal", "controversial_comply")},
    "toyworld.vocab_size": (AT_LEAST_ONE, ""),
    "toyworld.perturbations": (COUNT, "0 = judges trained on clean responses only"),
    "ray.num_cpus": (AT_LEAST_ONE, "or null for all of this machine's"),
    "ray.placement_timeout_s": (POSITIVE, "seconds"),
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
    "reward.rules.ensemble_k": (COUNT, "the k of mean - k * std; 0 is the mean"),
    "reward.rules.fluency_min_logprob": (Bound(high=0), "the lowest token log-prob of an answer; null turns "
                                                        "the gate off"),
    "reward.rules.implausible_cap": (FINITE, ""),
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
    "trainer.entropy_coef": (FINITE, "0 turns it off; negative penalises entropy (sharpens the policy)"),
    "trainer.workers": (AT_LEAST_ONE, ""),
    "trainer.lora.rank": (COUNT, "0 is full fine-tuning"),
    "trainer.lora.alpha": (POSITIVE, ""),
    "trainer.lora.dropout": (Bound(0, 1, high_open=True), ""),
    "trainer.gpus": (COUNT, ""),
    "trainer.cpus": (COUNT, ""),
    "trainer.sync_bucket_mb": (AT_LEAST_ONE, "the weight sync's bucket size; the extra memory during a sync"),
    "eval.every": (COUNT, "0: only before and after training"),
    "eval.samples_per_prompt": (AT_LEAST_ONE, ""),
    "eval.max_prompts": (COUNT, "0: all"),
    "checkpoint.every": (COUNT, "0: only the final checkpoint"),
    "checkpoint.keep_last": (COUNT, ""),
    "monitor.sample": (COUNT, "0: off"),
    "monitor.implausible_logprob": (Bound(high=0), "a token log-prob"),
    "monitor.probe_top_p": (FRACTION, "null: no tail probe"),
    "monitor.alarm.threshold": (FINITE, ""),
    "monitor.alarm.patience": (AT_LEAST_ONE, "monitored steps in a row"),
    "monitor.alarm.window": (AT_LEAST_ONE, "monitored steps averaged"),
}
RANGES.update({"eval.judge." + k.removeprefix("guard."): v for k, v in list(RANGES.items())
               if k.startswith("guard.")})



def _out_of_range(key: str, allowed: str, value: Any) -> ConfigError:
    return ConfigError(f"Config key '{key}' must be {allowed}, got {value!r}")


def _off(key: str, values: Mapping[str, Any]) -> bool:
    """True for a key inside an optional section that is null (eval.judge.* without a judge): unchecked."""
    parts = key.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts)))
    return any(p in values and values[p] is None for p in prefixes)


def check_choices(values: Mapping[str, Any]) -> None:
    """Refused values first (they say why), then the allowed choices of every CHOICES key (`values` also
    holds the optional sections, so that the keys of one that is off are skipped)."""
    for key, allowed in CHOICES.items():
        if _off(key, values):
            continue
        value = values[key]
        if (key, value) in REFUSED:
            raise ConfigError(f"Config key '{key}' cannot be {value!r}: {REFUSED[key, value]}")
        if value not in allowed:
            raise ConfigError(f"Config key '{key}' must be one of {allowed}, got {value!r}")


def _check_relations(v: Mapping[str, Any]) -> None:
    """Bounds that depend on another key's value."""
    batch = v["data.prompts_per_step"] * v["rollout.samples_per_prompt"]
    if v["trainer.minibatches"] > batch:  # the trainer would silently run fewer optimizer steps than asked
        raise _out_of_range("trainer.minibatches", f"at most the rollout batch, data.prompts_per_step x "
                            f"rollout.samples_per_prompt = {batch}", v["trainer.minibatches"])
    if v["trainer.warmup_steps"] >= v["trainer.steps"]:
        raise _out_of_range("trainer.warmup_steps", f"less than trainer.steps = {v['trainer.steps']} (a run that "
                            "is all warm-up never trains at trainer.lr)", v["trainer.warmup_steps"])
    for part in ("policy_sft", "guard_sft", "judge_sft",
                                                                       "reward_model_sft"):
        steps, warmup = v[f"toyworld.{part}.steps"], v[f"toyworld.{part}.warmup_steps"]
        if warmup >= steps:
            raise _out_of_range(f"toyworld.{part}.warmup_steps", f"less than toyworld.{part}.steps = {steps}",
                                warmup)
    unsafe, refusal = v["toyworld.harmful_unsafe"], v["toyworld.harmful_refusal"]
    if unsafe + refusal > 1:
        raise _out_of_range("toyworld.harmful_refusal", f"at most 1 - toyworld.harmful_unsafe = {1 - unsafe:g} "
                            "(the two are shares of the harmful prompts)", refusal)
    for part in ("policy", "guard", "reward_model"):
        heads, kv_heads = v[f"toyworld.{part}.num_heads"], v[f"toyworld.{part}.num_kv_heads"]
        if heads % kv_heads:
            raise _out_of_range(f"toyworld.{part}.num_kv_heads", f"a divisor of toyworld.{part}.num_heads = "
                                f"{heads}", kv_heads)
    judge = v["eval.judge"] is not None
    for section in ("rollout", "guard", *(("eval.judge",) if judge else ())):
        new, room = v[f"{section}.max_new_tokens"], v[f"{section}.max_model_len"]
        if new >= room:
            raise _out_of_range(f"{section}.max_new_tokens", f"less than {section}.max_model_len = {room} (the "
                                "prompt needs room too)", new)
    for name, cap in v["reward.rules.category_caps"].items():
        if not FINITE.contains(cap):
            raise _out_of_range(f"reward.rules.category_caps.{name}", str(FINITE), cap)
    if v["helpfulness.ensemble"] and (v["helpfulness.model"] is None or v["helpfulness.backend"] == "http"):
        raise _out_of_range("helpfulness.ensemble", "[] with helpfulness.model null or helpfulness.backend="
                            "http (the members are hosted beside helpfulness.model in the hf or vllm RM actors)",
                            v["helpfulness.ensemble"])
    if v["trainer.lora.rank"] and not v["trainer.lora.target_modules"]:
        raise _out_of_range("trainer.lora.target_modules", "a non-empty list when trainer.lora.rank > 0",
                            v["trainer.lora.target_modules"])
    remote = (("guard", v["guard.backend"] in ("http", "openai")),
              ("helpfulness", v["helpfulness.backend"] == "http" and v["helpfulness.model"] is not None),
              ("eval.judge", judge and v["eval.judge.backend"] in ("http", "openai")))
    for section, is_remote in remote:
        if is_remote and not v[f"{section}.urls"]:
            raise _out_of_range(f"{section}.urls", f"at least one endpoint with {section}.backend="
                                f"{v[section + '.backend']}", v[f"{section}.urls"])
    metric = v["monitor.alarm.metric"]
    if metric is not None and v["monitor.sample"] == 0:
        raise _out_of_range("monitor.alarm.metric", "null while monitor.sample = 0 (the monitor is off, so "
                            "the alarm would never see a value)", metric)
    if v["monitor.probe_top_p"] is not None and v["monitor.sample"] == 0:
        raise _out_of_range("monitor.probe_top_p", "null while monitor.sample = 0 (the probe samples the "
                            "monitor's prompts)", v["monitor.probe_top_p"])
    if metric == "monitor/probe_implausible_advantage" and v["monitor.probe_top_p"] is None:
        raise _out_of_range("monitor.alarm.metric", "a statistic the run computes: "
                            "monitor/probe_implausible_advantage needs monitor.probe_top_p", metric)
    if metric == "monitor/judge_disagreement" and not judge:
        raise _out_of_range("monitor.alarm.metric", "a statistic the run computes: "
                            "monitor/judge_disagreement needs eval.judge", metric)


def check_ranges(values: Mapping[str, Any], nullable: set[str]) -> None:
    """Refuse numbers no run can use (`nullable` keys may also be None), then the relations between keys."""
    for key, (bound, why) in RANGES.items():
        value = values[key]
        if (value is None and key in nullable) or _off(key, values):
            continue
        if not bound.contains(value):
            raise _out_of_range(key, f"{bound} ({why})" if why else str(bound), value)
    _check_relations(values)
