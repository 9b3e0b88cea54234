"""`saferl config show`: every key of the resolved config with its source (default, file, override), and
`saferl --version`."""

import re

import pytest

from saferl import __version__
from saferl.cli.config_show import resolved_lines, source_of
from saferl.cli.main import main


def test_source_is_the_last_mapping_that_names_the_key():
    sources = [("run.yaml", {"trainer": {"lr": 1e-3}, "eval": {"judge": {"model": "x"}}}),
               ("the command line", {"trainer": {"steps": 2}, "guard": None})]
    assert source_of("trainer.lr", sources) == "file"
    assert source_of("trainer.steps", sources) == "override"
    assert source_of("trainer.minibatches", sources) == "default"
    assert source_of("eval.judge.model", sources) == "file"
    assert source_of("eval.judge.backend", sources) == "default"  # the section's other keys keep defaults
    assert source_of("guard.model", sources) == "override"  # a section above set to null
    assert source_of("run.dir", []) == "default"


def parse(lines):
    out = {}
    for line in lines:
        key, rest = line.split(": ", 1)
        value, source = re.fullmatch(r"(.*?)\s+# (default|file|override)", rest).groups()
        out[key] = (value, source)
    return out


def test_resolved_config_shows_values_and_sources(tmp_path):
    from saferl.config import LEAF_KEYS

    cfg = tmp_path / "run.yaml"
    cfg.write_text("trainer:\n  lr: 0.001\n  steps: 5\neval:\n  judge:\n    model: toyworld:judge\n")
    got = parse(resolved_lines(str(cfg), ["trainer.steps=2", "logging.verbose=true"]))
    assert got["trainer.lr"] == ("0.001", "file")
    assert got["trainer.steps"] == ("2", "override")  # the override wins over the file
    assert got["logging.verbose"] == ("true", "override")
    assert got["trainer.minibatches"] == ("2", "default")
    assert got["run.dir"] == ("runs/toy", "default")
    assert got["ray.address"] == ("null", "default")
    assert got["eval.judge.model"] == ("toyworld:judge", "file")
    assert got["eval.judge.backend"] == ("vllm", "default")
    assert got["trainer.lora.target_modules"][0].startswith('["q_proj", ')
    assert "eval.judge" not in got  # a section that is on shows its keys
    assert len(got) == len(LEAF_KEYS) - 1
    off = parse(resolved_lines(str(cfg), ["eval.judge=null"]))
    assert off["eval.judge"] == ("null", "override") and not any(k.startswith("eval.judge.") for k in off)
    assert parse(resolved_lines(None, []))["eval.judge"] == ("null", "default")


def test_cli_config_show_version_and_a_bad_key(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("trainer:\n  lr: 0.001\n")
    assert main(["config", "show", "-c", str(cfg), "trainer.steps=3", "-v"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# resolved config: schema defaults <- {cfg} (file) <- 2 override(s)\n")
    assert re.search(r"^trainer\.steps: 3 +# override$", out, re.M)
    assert re.search(r"^trainer\.lr: 0\.001 +# file$", out, re.M)
    assert re.search(r"^logging\.verbose: true +# override$", out, re.M)
    assert main(["config", "show", "trainer.stepz=3"]) == 2
    assert "trainer.steps" in capsys.readouterr().err  # the closest valid key is named
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"saferl {__version__}\n"
