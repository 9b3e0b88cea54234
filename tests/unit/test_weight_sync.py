"""Weight-sync planning and the bucket wire format (pure CPU, hand-computed plans; no engine)."""

import pytest
import torch

from saferl.engines import pack_bucket, unpack_bucket
from saferl.trainer.weight_sync import BucketWeightSync, engine_module, plan_buckets

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
L0 = "model.layers.0."
LAYOUT = [("model.embed_tokens.weight", 100), (L0 + "self_attn.q_proj.weight", 10),
          (L0 + "self_attn.k_proj.weight", 5), (L0 + "self_attn.v_proj.weight", 5),
          (L0 + "self_attn.o_proj.weight", 10), (L0 + "self_attn.q_norm.weight", 1),
          (L0 + "mlp.gate_proj.weight", 20), (L0 + "mlp.up_proj.weight", 20), (L0 + "mlp.down_proj.weight", 20),
          ("model.norm.weight", 1), ("lm_head.weight", 100)]


def test_engine_module_fuses_the_packed_parts():
    assert engine_module(L0 + "self_attn.v_proj.weight", PACKED) == L0 + "self_attn.qkv_proj"
    assert engine_module(L0 + "mlp.up_proj.weight", PACKED) == L0 + "mlp.gate_up_proj"
    assert engine_module(L0 + "self_attn.o_proj.weight", PACKED) == L0 + "self_attn.o_proj"
    assert engine_module("lm_head.weight", PACKED) == "lm_head"


def test_buckets_of_40_bytes_by_hand():
    """embed (100) alone; q+k+v (20) + o (10) + q_norm (1) = 31, gate+up (40) would make 71; gate+up = 40;
    down (20) + norm (1) = 21; lm_head (100) alone."""
    names = [[n.removeprefix(L0) for n in b] for b in plan_buckets(LAYOUT, 40, PACKED)]
    assert names == [["model.embed_tokens.weight"],
                     ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                      "self_attn.o_proj.weight", "self_attn.q_norm.weight"],
                     ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                     ["mlp.down_proj.weight", "model.norm.weight"], ["lm_head.weight"]]


def test_one_big_bucket_and_fused_parts_out_of_order():
    assert plan_buckets(LAYOUT, 10**6, PACKED) == [[n for n, _ in LAYOUT]]
    # A fused module's parts travel together, at the first part's place, even when the order splits them.
    scattered = [("a.q_proj.weight", 4), ("a.o_proj.weight", 4), ("a.k_proj.weight", 4), ("a.v_proj.weight", 4)]
    assert plan_buckets(scattered, 12, PACKED) == [["a.q_proj.weight", "a.k_proj.weight", "a.v_proj.weight"],
                                                   ["a.o_proj.weight"]]
    with pytest.raises(ValueError):
        plan_buckets(LAYOUT, 0, PACKED)


def test_pack_views_the_tensors_and_unpack_restores_them():
    w = torch.randn(3, 4)
    b = torch.randn(5, dtype=torch.float32).to(torch.bfloat16)
    bucket = pack_bucket([("w", w), ("b", b), ("t", w.t())])  # a transposed view is made contiguous (a copy)
    assert bucket.nbytes == 48 + 10 + 48
    assert bucket.data[0].ctypes.data == w.data_ptr()  # no copy of a contiguous CPU tensor
    got = dict(unpack_bucket(bucket))
    assert torch.equal(got["w"], w) and got["b"].dtype == torch.bfloat16 and torch.equal(got["b"], b)
    assert torch.equal(got["t"], w.t())


class FakeTrainer:
    def __init__(self):
        self.asked = []

    def weight_layout(self):
        return LAYOUT

    def weight_bucket(self, names):
        self.asked.append(names)
        return names


class FakeRollout:
    def __init__(self):
        self.events = []

    def packed_modules(self):
        return PACKED

    def begin_weight_update(self):
        self.events.append("begin")

    def load_weight_bucket(self, bucket):
        self.events.append(len(bucket))

    def finish_weight_update(self):
        self.events.append("finish")


def test_push_streams_the_plan_between_begin_and_finish():
    trainer, rollout = FakeTrainer(), FakeRollout()
    sync = BucketWeightSync(trainer, rollout, 40)
    assert sync.push() == 292 and sync.push() == 292
    assert rollout.events == ["begin", 1, 5, 2, 2, 1, "finish"] * 2
    assert trainer.asked[:5] == plan_buckets(LAYOUT, 40, PACKED)


def test_hf_engine_loads_buckets_into_its_parameters(tiny_policy):
    """The HF engine's side of a streamed update: small buckets (one module each) replace every weight, the
    tied head included, and its logits follow."""
    from transformers import AutoModelForCausalLM

    from saferl.engines import HFEngine

    path, _ = tiny_policy
    engine = HFEngine(path)
    source = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = source.state_dict()
    layout = [(name, t.nbytes) for name, t in state.items()]
    engine.begin_weight_update()
    for names in plan_buckets(layout, 1, engine.packed_modules()):
        engine.load_weight_bucket(pack_bucket([(n, state[n]) for n in names]))
    engine.finish_weight_update()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(engine.model(ids).logits, source(ids).logits, atol=1e-6)
    assert all(torch.equal(engine.model.state_dict()[k], v) for k, v in state.items())
