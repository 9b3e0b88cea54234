"""The benchmarks' own checks: the trainer comparison fails on different maths, model calls are counted, and a
results file records how it was made."""

import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import guard_batching  # noqa: E402
import record  # noqa: E402
import trainer_vs_trl  # noqa: E402


def test_trainer_vs_trl_passes_only_when_loss_gradients_and_entropy_agree():
    same = dict(loss_ours=2.2e-8, loss_trl=1.5e-8, dg=2.8e-8, g=1.9e-2, ent_ours=0.068134, ent_trl=0.068134)
    assert trainer_vs_trl.same_maths(**same) == []
    for change, what in ((dict(dg=1e-5), "gradients"), (dict(loss_ours=math.nan), "loss"),
                         (dict(loss_ours=2e-6), "loss"), (dict(ent_ours=0.0438), "entropy")):
        failed = trainer_vs_trl.same_maths(**{**same, **change})
        assert len(failed) == 1 and what in failed[0], (change, failed)


class _Engine:
    def generate(self, prompts, sampling, seeds):
        return [[f"out {p}"] for p in prompts]


def test_guard_batching_counts_the_engine_calls_it_measures():
    engine = guard_batching.CountingEngine(_Engine())
    assert engine.generate([1, 2, 3], None, seeds=[0, 0, 0]) == [["out 1"], ["out 2"], ["out 3"]]
    engine.generate([4], None, seeds=[0])
    assert (engine.calls, engine.items) == (2, 4)
    engine.reset()
    assert (engine.calls, engine.items) == (0, 0)


def test_recorded_results_file_has_command_date_and_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(record.ROOT / "benchmarks" / "x.py"), "--steps", "2"])
    out = tmp_path / "results" / "x.md"
    with record.recorded(str(out)):
        print("ratio 0.83x")
    assert capsys.readouterr().out == "ratio 0.83x\n"  # still printed
    text = out.read_text()
    assert "- command: `python benchmarks/x.py --steps 2`" in text
    assert re.search(r"- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)
    assert "```\nratio 0.83x\n```" in text


def test_update_flops_by_hand():
    """h 2, MLP 3, 1 layer, 1 head of 2 (1 kv head), vocab 5. Per token the matmuls cost 2*2*(2 + 2*2) (q, k, v)
    + 2*2*2 (o) + 2*3*2*3 (MLP) = 68; a position attending to k keys adds 2*2*2*k. Prompt [a, b] (keys 1, 2),
    completion [c] (keys 3) and the LM head 2*5*2 on c: 2*68 + 8*3 + 68 + 8*3 + 20 = 272, times 3."""
    import types

    config = types.SimpleNamespace(hidden_size=2, intermediate_size=3, num_hidden_layers=1, head_dim=2,
                                   num_attention_heads=1, num_key_value_heads=1, vocab_size=5)
    assert trainer_vs_trl.update_flops(config, [[1, 2]], [[3]]) == 3 * 272
    # Two sequences of one group: the prompt (160 of the 272) counts twice, or once with shared_prompts.
    assert trainer_vs_trl.update_flops(config, [[1, 2], [1, 2]], [[3], [4]]) == 3 * 2 * 272
    assert trainer_vs_trl.update_flops(config, [[1, 2], [1, 2]], [[3], [4]], shared_prompts=True) == 3 * (160 + 2 * 112)


def test_stream_service_check_fails_on_any_different_verdict():
    import stream_service

    V = stream_service.Verdict
    want = [[V(30, "Safe", 0.9, "None", 0.8), V(31, "Unsafe", 0.7, "PII", 0.6)], [V(20, "Safe", 0.99, "None", 0.5)]]
    assert stream_service.mismatches([list(s) for s in want], want, "x") == []
    assert stream_service.mismatches([[want[0][0], want[0][1]._replace(risk_prob=0.70005)], want[1]], want, "x") == []
    for got, what in (([want[0][:1], want[1]], "1 verdicts, expected 2"),
                      ([[want[0][0], want[0][1]._replace(risk="Safe")], want[1]], "token 1"),
                      ([[want[0][0], want[0][1]._replace(category="Violent")], want[1]], "token 1"),
                      ([[want[0][0]._replace(position=29), want[0][1]], want[1]], "token 0"),
                      ([want[0], [want[1][0]._replace(category_prob=0.501)]], "probabilities"),
                      ([want[0]], "1 streams")):
        failed = stream_service.mismatches(got, want, "x")
        assert len(failed) == 1 and what in failed[0], (got, failed)
    assert stream_service.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert stream_service.percentile([float(i) for i in range(101)], 99) == 99.0
