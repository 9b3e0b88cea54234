"""A toy world that misses its quality targets is an error: the target check on hand-made metrics, and the
build, the cache and `saferl toyworld build` refusing a world whose (faked) evaluation misses them."""

import json
import math
from pathlib import Path

import pytest

from saferl.cli import main
from saferl.config import load_config
from saferl.toyworld import build as build_module
from saferl.toyworld import evaluate
from saferl.toyworld.evaluate import TARGETS, check_targets, missed_targets

GOOD = {"guard_safety_acc": 0.99, "guard_refusal_acc": 0.98, "rm_helpful_over_garbled": 0.96,
        "policy_harmful_unsafe_rate": 0.55, "policy_benign_refusal_rate": 0.2, "guard_category_acc": 0.1}


def test_targets_are_inclusive_ranges():
    assert missed_targets(GOOD) == []  # guard_category_acc has no target: any value passes
    edges = {key: lo for key, (lo, hi) in TARGETS.items()}
    assert missed_targets(edges) == []
    assert missed_targets({key: hi for key, (lo, hi) in TARGETS.items()}) == []


def test_each_kind_of_miss_is_named_with_its_value_and_target():
    metrics = {**GOOD, "guard_safety_acc": 0.9699, "policy_harmful_unsafe_rate": 0.71,
               "policy_benign_refusal_rate": math.nan}
    del metrics["rm_helpful_over_garbled"]
    assert missed_targets(metrics) == [
        "guard_safety_acc 0.970 (target >= 0.97)",  # 0.9699 prints as 0.970 but is below 0.97
        "rm_helpful_over_garbled missing (target >= 0.90)",
        "policy_harmful_unsafe_rate 0.710 (target 0.40-0.70)",
        "policy_benign_refusal_rate nan (target 0.10-0.30)",
    ]
    with pytest.raises(ValueError, match=r"the toy world at /w misses its quality targets: guard_safety_acc "
                                         r"0\.970 \(target >= 0\.97\); rm_helpful_over_garbled missing"):
        check_targets(metrics, "/w")
    check_targets(GOOD, "/w")  # no error


@pytest.fixture
def fake_build(monkeypatch):
    """`build` with the tokenizers skipped and training and evaluation (`_train_and_evaluate`) returning
    `state["metrics"]`; `state["trained"]` counts training runs."""
    state = {"trained": 0, "metrics": dict(GOOD)}

    def train_and_evaluate(root, cfg, trainer, stream_guard):
        state["trained"] += 1
        return {"guard": 0.0, "policy": 0.0, "reward_model": 0.0}, dict(state["metrics"])

    monkeypatch.setattr(build_module, "_make_tokenizers", lambda root, cfg: None)
    monkeypatch.setattr(build_module, "_train_and_evaluate", train_and_evaluate)
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


def test_extra_parts_are_built_once_on_first_use(fake_build, tmp_path, monkeypatch):
    """The judge and the further RMs are not part of the core build; the first `ensure_part` of any of them
    trains all three (once), a core part never does, and a judge missing its targets is refused."""
    trained = []

    def train_parts(parts, root, cfg, trainer):
        trained.extend(parts)
        for part in parts:
            (Path(root) / part / "model.safetensors").write_text("weights")
        return {part: 0.0 for part in parts}

    monkeypatch.setattr(build_module, "_train_parts", train_parts)
    monkeypatch.setattr(build_module.multiprocessing, "get_context", lambda kind: _InlineContext())
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda path: _SavingTokenizer())
    monkeypatch.setattr(evaluate, "evaluate_extras", lambda paths, parts: {"judge_safety_acc": 0.99,
                                                                           "judge_refusal_acc": 1.0})
    cfg = load_config(None, [f"toyworld.cache_dir={tmp_path}"]).toyworld
    assert build_module.ensure_part(cfg, "guard").name == "guard" and trained == []
    judge = build_module.ensure_part(cfg, "judge")
    assert sorted(trained) == ["judge", "reward_model_1", "reward_model_2"]
    assert (judge / "model.safetensors").is_file() and (judge.parent / "extras.json").is_file()
    assert not list(judge.parent.glob("extras.tmp*"))  # written under a temporary name, renamed
    build_module.ensure_part(cfg, "reward_model_2")
    assert len(trained) == 3  # cached
    # Cached extras that miss their targets are refused on every use, not only when built.
    (judge.parent / "extras.json").write_text(json.dumps({"judge_safety_acc": 0.5, "judge_refusal_acc": 1.0}))
    with pytest.raises(ValueError, match=r"judge_safety_acc 0\.500 \(target >= 0\.97\)"):
        build_module.ensure_part(cfg, "judge")
    assert build_module.ensure_part(cfg, "guard").name == "guard"  # the core is not affected


def test_a_second_caller_waits_for_the_extras_being_built_and_reuses_them(tmp_path, monkeypatch):
    """Two runs starting on a world whose extras are missing: only the first builds them (a second build
    into the same directory would race it), the other waits on the lock and reuses them."""
    import threading
    import time

    root = tmp_path / "world"
    root.mkdir()
    paths = build_module.ToyWorldPaths(root)
    built, release = [], threading.Event()

    def build_extras(paths, cfg, trainer):
        built.append(threading.current_thread().name)
        release.wait(30)
        (paths.root / "extras.json").write_text(json.dumps({"judge_safety_acc": 0.99, "judge_refusal_acc": 1.0}))

    monkeypatch.setattr(build_module, "ensure_built", lambda cfg, trainer: paths)
    monkeypatch.setattr(build_module, "build_extras", build_extras)
    cfg = load_config(None, []).toyworld
    got = {}
    runs = [threading.Thread(target=lambda n=n: got.update({n: build_module.ensure_part(cfg, "judge")}), name=n)
            for n in ("first", "second")]
    runs[0].start()
    while not built:
        time.sleep(0.01)
    runs[1].start()
    runs[1].join(1.0)
    assert runs[1].is_alive()  # waiting on the lock, not building
    release.set()
    for run in runs:
        run.join(30)
    assert built == ["first"] and got == {"first": root / "judge", "second": root / "judge"}


class _SavingTokenizer:
    def save_pretrained(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)


class _InlineContext:
    """multiprocessing's spawn context, run in this process (the test fakes the training)."""

    def Pool(self, n, initializer=None):  # noqa: N802 - the multiprocessing name
        return _InlinePool()


class _InlinePool:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def apply_async(self, fn, args):
        result = fn(*args)
        return type("Done", (), {"get": lambda self: result})()


# A build in its own process, its training and evaluation replaced by a stand-in that records the run in the
# log (argv[2]) and holds the build until <cache>/release exists.
LOCKED_BUILD = """
import json, sys, time
from pathlib import Path
from saferl.config import load_config
from saferl.toyworld import build

cache, log = sys.argv[1], Path(sys.argv[2])

def train_and_evaluate(root, cfg, trainer, stream_guard):
    with log.open("a") as f:
        f.write(f"trained {root}\\n")
    deadline = time.monotonic() + 60
    while not (Path(cache) / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {}, json.loads(sys.argv[3])

build._make_tokenizers = lambda root, cfg: None
build._train_and_evaluate = train_and_evaluate
cfg = load_config(None, [f"toyworld.cache_dir={cache}"]).toyworld
print("built", build.ensure_built(cfg).root, flush=True)
"""


def test_a_second_process_waits_for_the_first_build_and_reuses_it(tmp_path):
    """Two processes ask for the same world at once: the second says it waits, then reuses the first's world
    without training."""
    import os
    import subprocess
    import sys
    import time

    log = tmp_path / "trained.log"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = [sys.executable, "-c", LOCKED_BUILD, str(tmp_path), str(log), json.dumps(GOOD)]
    outs = [tmp_path / "first.out", tmp_path / "second.out"]

    def start(out):
        with out.open("w") as f:
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)

    def wait_for(condition, what):
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: " + " | ".join(
                o.read_text() for o in outs if o.is_file())
            time.sleep(0.05)

    first = start(outs[0])
    wait_for(log.is_file, "the first build to start training")  # it holds the lock now
    second = start(outs[1])
    wait_for(lambda: "waiting for another process building" in outs[1].read_text(), "the second to wait")
    (tmp_path / "release").touch()
    assert first.wait(120) == 0 and second.wait(120) == 0, [o.read_text() for o in outs]
    root = load_config(None, [f"toyworld.cache_dir={tmp_path}"]).toyworld
    root = build_module.toyworld_paths(root).root
    assert log.read_text() == f"trained {root.with_name(root.name + f'.tmp{first.pid}')}\n"  # trained once
    first_out, second_out = (o.read_text() for o in outs)
    assert f"built {root}\n" in first_out and f"built {root}\n" in second_out
    assert "[toyworld] building" in first_out and "[toyworld] building" not in second_out
    assert (root / "metrics.json").is_file() and not list(tmp_path.glob("*.tmp*"))
