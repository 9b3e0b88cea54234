import pytest

from saferl.actor_group import check_resources
from saferl.config import load_config
from saferl.placement import count_params, format_plan, plan, requests


def test_requests_count_tensor_parallel_gpus():
    cfg = load_config(None, ["rollout.num_engines=2", "rollout.gpus_per_engine=1", "rollout.tensor_parallel_size=2",
                             "guard.gpus_per_actor=1", "trainer.gpus=1"])
    req = requests(plan(cfg))
    assert req["rollout"] == (2, 0.5, 2.0)
    assert sum(n * g for n, _, g in req.values()) == 6
    assert "total: " in format_plan(cfg) and "6 GPUs" in format_plan(cfg)


def test_check_resources_fails_fast_with_the_numbers():
    req = {"rollout": (2, 1.0, 1.0), "trainer": (1, 1.0, 1.0)}
    check_resources(req, {"CPU": 4.0, "GPU": 3.0})
    with pytest.raises(RuntimeError, match="asks for 3 GPUs but the Ray cluster has 2"):
        check_resources(req, {"CPU": 4.0, "GPU": 2.0})
    with pytest.raises(RuntimeError, match="asks for 3 CPUs"):
        check_resources(req, {"CPU": 2.0, "GPU": 8.0})


def test_param_count_of_a_qwen3_config(tmp_path):
    # Qwen3-0.6B-like shapes: 28 layers, hidden 1024, 16 q / 8 kv heads of 128, ff 3072, vocab 151936, tied.
    (tmp_path / "config.json").write_text(
        '{"hidden_size": 1024, "num_hidden_layers": 28, "vocab_size": 151936, "intermediate_size": 3072,'
        ' "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": true}')
    assert 0.55e9 < count_params(tmp_path / "config.json") < 0.65e9  # Qwen3-0.6B has 0.6B parameters
