"""Every dtype string of the config is checked at load time, naming its key; fp16 training is refused."""

import os

import pytest

from saferl.cli import main
from saferl.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("key", ["policy.dtype", "guard.dtype", "helpfulness.dtype"])
def test_inference_dtype_is_checked_naming_the_key(key):
    """'fp32' is not a torch dtype name: the HF engines' getattr(torch, 'fp32') would fail inside an actor, after
    start-up. The real names load, float16 included (no gradients in these roles)."""
    with pytest.raises(ConfigError, match=f"'{key}'.*'fp32'"):
        load_config(None, [f"{key}=fp32"])
    for dtype in ("float32", "bfloat16", "float16"):
        assert getattr(load_config(None, [f"{key}={dtype}"]), key.split(".")[0]).dtype == dtype


def test_trainer_float16_is_refused_with_the_reason():
    """fp16 autocast without a loss scaler lets gradients underflow; the error says so and names bfloat16."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trainer.dtype=float16"])
    assert "'trainer.dtype'" in str(e.value)
    assert "loss scaling" in str(e.value) and "bfloat16" in str(e.value)


def test_cli_refuses_float16_training_in_one_line(capsys):
    """`saferl train --dry-run ... trainer.dtype=float16` exits 2 with the key and no traceback."""
    assert main(["train", "--dry-run", "-c", os.path.join(ROOT, "configs/toy.yaml"), "trainer.dtype=float16"]) == 2
    err = capsys.readouterr().err
    assert "trainer.dtype" in err and "loss scaling" in err and "Traceback" not in err
