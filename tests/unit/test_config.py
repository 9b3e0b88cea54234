import glob
import os

import pytest

from saferl.cli import main
from saferl.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_defaults_and_override():
    cfg = load_config(None, ["trainer.lr=1e-4", "rollout.num_engines=3"])
    assert cfg.trainer.lr == 1e-4
    assert cfg.rollout.num_engines == 3
    assert cfg.trainer.clip_low == 3e-4 and cfg.trainer.clip_high == 4e-4


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs/toy.yaml"), ["trainer.lrr=1"])
    assert "'trainer.lrr'" in str(e.value) and "'trainer.lr'" in str(e.value)


def test_unknown_section_suggests_full_key():
    with pytest.raises(ConfigError, match="trainerr.lr.*Did you mean 'trainer.lr'"):
        load_config(None, ["trainerr.lr=1"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trainer.steps=many"])
    assert "'trainer.steps'" in str(e.value) and "int" in str(e.value)


def test_bad_choice_is_rejected():
    with pytest.raises(ConfigError, match="rollout.backend"):
        load_config(None, ["rollout.backend=sglang"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and "trainer.steps" in str(e.value)


def test_malformed_yaml_names_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(bad)


def test_cli_reports_config_error(capsys):
    assert main(["train", "-c", os.path.join(ROOT, "configs/toy.yaml"), "trainer.lrr=1"]) == 2
    assert "trainer.lrr" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_config_dry_runs(path, capsys):
    assert main(["train", "--dry-run", "-c", path]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "rollout" in out and "trainer" in out


def test_mapping_fields_take_any_key_but_check_value_types():
    """reward.rules.category_caps is a mapping: its keys are data (checked by RewardRules), values floats."""
    cfg = load_config(None, ["reward.rules.category_caps={Violent: -12.0, PII: -3}"])
    assert cfg.reward.rules.category_caps == {"Violent": -12.0, "PII": -3.0}
    with pytest.raises(ConfigError, match=r"reward.rules.category_caps.Violent.*dict\[str, float\].*'abc'"):
        load_config(None, ["reward.rules.category_caps={Violent: abc}"])
