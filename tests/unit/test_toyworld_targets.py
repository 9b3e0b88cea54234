"""A toy world that misses its quality targets is an error: the target check on hand-made metrics, and the
build, the cache and `saferl toyworld build` refusing a world whose (faked) evaluation misses them."""

import json
import math

import pytest

from saferl.cli import main
from saferl.config import load_config
from saferl.toyworld import build as build_module
from saferl.toyworld import evaluate
from saferl.toyworld.evaluate import TARGETS, check_targets, missed_targets

GOOD = {"guard_safety_acc": 0.99, "guard_refusal_acc": 0.98, "rm_helpful_over_refusal": 0.96,
        "policy_harmful_unsafe_rate": 0.55, "policy_benign_refusal_rate": 0.2, "guard_category_acc": 0.1}


def test_targets_are_inclusive_ranges():
    assert missed_targets(GOOD) == []  # guard_category_acc has no target: any value passes
    edges = {key: lo for key, (lo, hi) in TARGETS.items()}
    assert missed_targets(edges) == []
    assert missed_targets({key: hi for key, (lo, hi) in TARGETS.items()}) == []


def test_each_kind_of_miss_is_named_with_its_value_and_target():
    metrics = {**GOOD, "guard_safety_acc": 0.9699, "policy_harmful_unsafe_rate": 0.71,
               "policy_benign_refusal_rate": math.nan}
    del metrics["rm_helpful_over_refusal"]
    assert missed_targets(metrics) == [
        "guard_safety_acc 0.970 (target >= 0.97)",  # 0.9699 prints as 0.970 but is below 0.97
        "rm_helpful_over_refusal missing (target >= 0.95)",
        "policy_harmful_unsafe_rate 0.710 (target 0.40-0.70)",
        "policy_benign_refusal_rate nan (target 0.10-0.30)",
    ]
    with pytest.raises(ValueError, match=r"the toy world at /w misses its quality targets: guard_safety_acc "
                                         r"0\.970 \(target >= 0\.97\); rm_helpful_over_refusal missing"):
        check_targets(metrics, "/w")
    check_targets(GOOD, "/w")  # no error


@pytest.fixture
def fake_build(monkeypatch):
    """`build` with the tokenizers and training skipped and `evaluate_world` returning `state["metrics"]`;
    `state["trained"]` counts training runs."""
    state = {"trained": 0, "metrics": dict(GOOD)}

    def train_models(root, cfg):
        state["trained"] += 1
        return {"guard": 0.0, "policy": 0.0, "reward_model": 0.0}

    monkeypatch.setattr(build_module, "_make_tokenizers", lambda root, cfg: None)
    monkeypatch.setattr(build_module, "_train_models", train_models)
    monkeypatch.setattr(evaluate, "evaluate_world", lambda paths, seed=0: dict(state["metrics"]))
    return state


def test_build_that_misses_its_targets_raises_and_is_not_reused(fake_build, tmp_path, capsys):
    fake_build["metrics"]["policy_benign_refusal_rate"] = 0.45
    cfg = load_config(None, [f"toyworld.cache_dir={tmp_path}"]).toyworld
    root = build_module.toyworld_paths(cfg).root
    with pytest.raises(ValueError, match=rf"toy world at {root} misses its quality targets: "
                                         r"policy_benign_refusal_rate 0\.450 \(target 0\.10-0\.30\)"):
        build_module.build(cfg)
    assert json.loads((root / "metrics.json").read_text())["policy_benign_refusal_rate"] == 0.45  # kept
    # The cached miss is refused again, without a rebuild.
    with pytest.raises(ValueError, match="policy_benign_refusal_rate 0.450"):
        build_module.ensure_built(cfg)
    assert fake_build["trained"] == 1
    # The command exits non-zero with the message on one line, no traceback.
    capsys.readouterr()
    assert main(["toyworld", "build", f"toyworld.cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saferl: error: the toy world at ") and "policy_benign_refusal_rate 0.450" in err
    assert "Traceback" not in err and fake_build["trained"] == 1


def test_build_that_meets_its_targets_is_cached_and_reused(fake_build, tmp_path):
    cfg = load_config(None, [f"toyworld.cache_dir={tmp_path}"]).toyworld
    paths = build_module.build(cfg)
    assert build_module.ensure_built(cfg) == paths and fake_build["trained"] == 1
