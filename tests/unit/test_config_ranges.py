"""Out-of-range config values are refused by load_config, naming the key, the allowed range and the value."""

import dataclasses
import os

import pytest

from saferl.config import SCHEMA_KEYS, ConfigError, load_config
from saferl.config_checks import MODEL_SHAPE_FIELDS, RANGES, Bound

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY = os.path.join(ROOT, "configs", "toy.yaml")

# (override, key named in the error, a fragment of the allowed range)
BAD = [
    ("trainer.steps=0", "trainer.steps", ">= 1"),
    ("data.prompts_per_step=0", "data.prompts_per_step", ">= 1"),
    ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt", "group advantage"),
    ("eval.samples_per_prompt=0", "eval.samples_per_prompt", ">= 1"),
    ("rollout.num_engines=0", "rollout.num_engines", ">= 1"),
    ("guard.num_actors=0", "guard.num_actors", ">= 1"),
    ("helpfulness.num_actors=0", "helpfulness.num_actors", ">= 1"),
    ("trainer.workers=0", "trainer.workers", ">= 1"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens", ">= 1"),
    ("guard.max_new_tokens=0", "guard.max_new_tokens", ">= 1"),
    ("trainer.lr=0", "trainer.lr", "> 0"),
    ("trainer.lr=-1e-4", "trainer.lr", "> 0"),
    ("trainer.lr=inf", "trainer.lr", "> 0"),
    ("trainer.lr=nan", "trainer.lr", "> 0"),
    ("trainer.clip_low=0", "trainer.clip_low", "in (0, 1)"),
    ("trainer.clip_low=1", "trainer.clip_low", "in (0, 1)"),
    ("trainer.clip_high=0", "trainer.clip_high", "> 0"),
    ("trainer.kl_coef=-0.1", "trainer.kl_coef", ">= 0"),
    ("trainer.entropy_coef=nan", "trainer.entropy_coef", "a finite number"),  # negative: a penalty
    ("rollout.temperature=0", "rollout.temperature", "RL needs sampling"),
    ("rollout.top_p=0", "rollout.top_p", "in (0, 1]"),
    ("rollout.top_p=1.5", "rollout.top_p", "in (0, 1]"),
    ("trainer.minibatches=0", "trainer.minibatches", ">= 1"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size", ">= 1"),
    ("checkpoint.every=-1", "checkpoint.every", ">= 0"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last", ">= 0"),
    ("eval.every=-5", "eval.every", ">= 0"),
    ("eval.max_prompts=-1", "eval.max_prompts", ">= 0"),
    ("trainer.warmup_steps=-1", "trainer.warmup_steps", ">= 0"),
    ("trainer.max_grad_norm=0", "trainer.max_grad_norm", "> 0"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay", ">= 0"),
    ("guard.timeout_s=0", "guard.timeout_s", "> 0"),
    ("helpfulness.timeout_s=-1", "helpfulness.timeout_s", "> 0"),
    ("guard.retries=-1", "guard.retries", ">= 0"),
    ("helpfulness.retries=-1", "helpfulness.retries", ">= 0"),
    ("guard.max_restarts=-2", "guard.max_restarts", ">= 0"),
    ("trainer.cpus=-0.5", "trainer.cpus", ">= 0"),
    ("trainer.gpus=-1", "trainer.gpus", ">= 0"),
    ("rollout.cpus_per_engine=-1", "rollout.cpus_per_engine", ">= 0"),
    ("guard.gpus_per_actor=-1", "guard.gpus_per_actor", ">= 0"),
    ("ray.num_cpus=0", "ray.num_cpus", ">= 1"),
    ("rollout.gpu_memory_utilization=0", "rollout.gpu_memory_utilization", "in (0, 1]"),
    ("guard.gpu_memory_utilization=1.2", "guard.gpu_memory_utilization", "in (0, 1]"),
    ("helpfulness.gpu_memory_utilization=0", "helpfulness.gpu_memory_utilization", "in (0, 1]"),
    ("helpfulness.batch_size=0", "helpfulness.batch_size", ">= 1"),
    ("helpfulness.fallback_score=nan", "helpfulness.fallback_score", "a finite number"),
    ("rollout.refill_rounds=-1", "rollout.refill_rounds", ">= 0"),
    ("monitor.probe_top_p=0", "monitor.probe_top_p", "in (0, 1]"),
    ("rollout.tensor_parallel_size=0", "rollout.tensor_parallel_size", ">= 1"),
    ("reward.rules.unsafe_cap=-inf", "reward.rules.unsafe_cap", "a finite number"),
    ("trainer.lora.rank=-8", "trainer.lora.rank", ">= 0"),
    ("trainer.lora.dropout=1", "trainer.lora.dropout", "in [0, 1)"),
    ("toyworld.harmful_unsafe=1.5", "toyworld.harmful_unsafe", "in [0, 1]"),
    ("toyworld.policy_sft.steps=0", "toyworld.policy_sft.steps", ">= 1"),
    ("toyworld.guard.num_layers=0", "toyworld.guard.num_layers", ">= 1"),
    # relations between keys
    ("trainer.minibatches=200", "trainer.minibatches", "data.prompts_per_step x rollout.samples_per_prompt = 128"),
    ("trainer.warmup_steps=40", "trainer.warmup_steps", "less than trainer.steps = 40"),
    ("rollout.max_new_tokens=512", "rollout.max_new_tokens", "less than rollout.max_model_len = 512"),
    ("guard.max_model_len=32", "guard.max_new_tokens", "less than guard.max_model_len = 32"),
    ("toyworld.harmful_refusal=0.5", "toyworld.harmful_refusal", "at most 1 - toyworld.harmful_unsafe"),
    ("toyworld.policy.num_kv_heads=3", "toyworld.policy.num_kv_heads", "a divisor"),
    ("toyworld.guard_sft.warmup_steps=350", "toyworld.guard_sft.warmup_steps", "less than"),
    ("reward.rules.category_caps={Violent: .nan}", "reward.rules.category_caps.Violent", "a finite number"),
    ("trainer.lora.target_modules=[]", "trainer.lora.target_modules", "trainer.lora.rank > 0"),
    ("guard.backend=http", "guard.urls", "at least one endpoint"),
    ("helpfulness.backend=http", "helpfulness.urls", "at least one endpoint"),
]


@pytest.mark.parametrize("override,key,allowed", BAD, ids=[b[0] for b in BAD])
def test_out_of_range_value_names_key_range_and_value(override, key, allowed):
    extra = ["trainer.lora.rank=8"] if key == "trainer.lora.target_modules" else []
    if key == "helpfulness.urls":  # configs/toy.yaml's RM ensemble is refused with a remote RM first
        extra = ["helpfulness.ensemble=[]"]
    with pytest.raises(ConfigError) as e:
        load_config(TOY, [override, *extra])
    message = str(e.value)
    assert f"'{key}'" in message and allowed in message
    assert "got " in message


def test_the_tail_probe_needs_the_monitor_and_its_alarm_needs_the_probe():
    with pytest.raises(ConfigError, match="'monitor.probe_top_p' must be null while monitor.sample = 0"):
        load_config(TOY, ["monitor.sample=0", "monitor.alarm.metric=null", "monitor.probe_top_p=1.0"])
    with pytest.raises(ConfigError, match="'monitor.alarm.metric'.*needs monitor.probe_top_p"):
        load_config(TOY, ["monitor.probe_top_p=null", "monitor.alarm.metric=monitor/probe_implausible_advantage"])
    cfg = load_config(TOY, ["monitor.probe_top_p=1.0", "monitor.alarm.metric=monitor/probe_implausible_advantage"])
    assert cfg.monitor.probe_top_p == 1.0


def test_minibatches_bound_follows_the_batch():
    # 3 prompts x 2 samples = 6 rollouts: 6 minibatches are fine, 7 would leave one empty.
    base = ["data.prompts_per_step=3", "rollout.samples_per_prompt=2"]
    assert load_config(TOY, [*base, "trainer.minibatches=6"]).trainer.minibatches == 6
    with pytest.raises(ConfigError, match=r"'trainer.minibatches'.*= 6, got 7"):
        load_config(TOY, [*base, "trainer.minibatches=7"])


@pytest.mark.parametrize("override", [
    "rollout.samples_per_prompt=2", "trainer.clip_low=0.2", "trainer.kl_coef=0", "eval.every=0",
    "checkpoint.every=0", "checkpoint.keep_last=0", "rollout.top_p=1", "trainer.warmup_steps=39",
    "ray.num_cpus=null", "helpfulness.fallback_score=null", "helpfulness.fallback_score=-3",
    "helpfulness.model=null", "trainer.lora.target_modules=[]",
])
def test_boundary_values_are_accepted(override):
    # Without an RM there is no ensemble either (configs/toy.yaml has one).
    extra = ["helpfulness.ensemble=[]"] if override == "helpfulness.model=null" else []
    load_config(TOY, [override, *extra])


def test_shipped_configs_pass():
    for name in ("toy.yaml", "toy_guard_only.yaml", "qwen3_4b_saferl.yaml", "qwen3_4b_guard_only.yaml"):
        load_config(os.path.join(ROOT, "configs", name))


def test_bad_value_in_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  samples_per_prompt: 1\n")
    with pytest.raises(ConfigError, match="'rollout.samples_per_prompt' must be >= 2"):
        load_config(bad)


def test_every_numeric_key_has_a_range():
    """A new int or float key needs a range in RANGES (or a reason to have none, here)."""
    unbounded = {"run.seed", "toyworld.seed", "eval.seed",  # any integer seeds the generators
                 "trainer.zero_stage"}  # a CHOICES key
    numeric = {k for k, t in SCHEMA_KEYS.items() if str(t).split(" ")[0] in ("int", "float")}
    assert sorted(numeric - unbounded - set(RANGES)) == []
    assert set(RANGES) <= set(SCHEMA_KEYS)


def test_the_checks_name_the_schemas_keys():
    """config_checks cannot import the schema (config.py imports it): its copies of key names must match."""
    from saferl.config import CHOICES_KEYS, ModelShape

    assert MODEL_SHAPE_FIELDS == tuple(f.name for f in dataclasses.fields(ModelShape))
    assert set(CHOICES_KEYS) <= set(SCHEMA_KEYS)


def test_bound_text_and_membership():
    assert str(Bound(0, 1, low_open=True)) == "in (0, 1]"
    assert str(Bound(0, 1, high_open=True)) == "in [0, 1)"
    assert str(Bound(2)) == ">= 2" and str(Bound(0, low_open=True)) == "> 0" and str(Bound()) == "a finite number"
    assert Bound(0, 1, low_open=True).contains(1) and not Bound(0, 1, low_open=True).contains(0)
    assert not Bound().contains(float("inf")) and not Bound().contains(True) and Bound().contains(-3)
