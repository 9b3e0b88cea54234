"""GSPO / GSPO-token / GRPO losses and token log-probs against hand-computed values."""

import math

import pytest
import torch

from saferl.trainer.gspo import nucleus_mask, policy_loss, token_entropy, token_logprobs, warn_if_misconfigured


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


def test_gspo_hand_value_with_padding():
    # Row 1's last position is padding; its junk values (5.0 vs -3.0) must not count.
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 5.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0, -0.6], [-0.2, -0.9, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    # seq 0: log-ratios 0.1, 0.0, 0.1 -> mean 0.2/3 -> s0 = exp(0.0666667) = 1.0689391
    #        A = +1, s0 > 1 + 0.06, so min(1.0689 * 1, 1.06 * 1) = 1.06 (clipped branch active) -> L0 = -1.06
    # seq 1: log-ratios -0.1, 0.2 -> mean 0.05 -> s1 = exp(0.05) = 1.0512711, inside [0.9, 1.06]
    #        A = -2 -> L1 = -(-2 * 1.0512711) = 2.1025422
    # loss = (-1.06 + 2.1025422) / 2 = 0.5212711
    loss, m = policy_loss(lp, old, adv, mask, mode="gspo", clip_low=0.1, clip_high=0.06)
    assert loss.item() == pytest.approx(0.5212711, abs=1e-6)
    assert m["clip_frac"] == 0.5 and m["clip_frac_high"] == 0.5 and m["clip_frac_low"] == 0.0
    assert m["ratio_max"] == pytest.approx(math.exp(0.2 / 3), abs=1e-6)
    assert m["ratio_mean"] == pytest.approx((math.exp(0.2 / 3) + math.exp(0.05)) / 2, abs=1e-6)
    # Gradient: seq 0 is clipped -> 0. Seq 1: d/dlp_1t [0.5 * 2 * s1] = 0.5 * 2 * s1 * (1/2) = 0.5 * s1.
    g = _grad(loss, lp)
    s1 = math.exp(0.05)
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.5 * s1, 0.5 * s1, 0.0]])
    torch.testing.assert_close(g, expected, atol=1e-6, rtol=0)


def test_gspo_variable_lengths_padding_is_inert():
    # The same 2-token sequence alone and padded to 5 with junk gives the same loss and gradient.
    lp_short = torch.tensor([[-0.4, -1.2]], requires_grad=True)
    old_short = torch.tensor([[-0.5, -1.0]])
    adv = torch.tensor([0.7])
    loss_a, _ = policy_loss(lp_short, old_short, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.2)
    lp_long = torch.tensor([[-0.4, -1.2, 3.0, -9.0, 1.0]], requires_grad=True)
    old_long = torch.tensor([[-0.5, -1.0, -7.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])
    loss_b, _ = policy_loss(lp_long, old_long, adv, mask, clip_low=0.2, clip_high=0.2)
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-7)
    torch.testing.assert_close(_grad(loss_b, lp_long)[:, :2], _grad(loss_a, lp_short))
    # Length normalisation: a 1-token and a 4-token sequence with the same per-token log-ratio share s_i.
    lp = torch.zeros(2, 4)
    old = torch.full((2, 4), -0.01)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    _, m = policy_loss(lp, old, torch.tensor([1.0, 1.0]), mask, clip_low=0.2, clip_high=0.2)
    assert m["ratio_max"] == pytest.approx(math.exp(0.01), abs=1e-7)
    assert m["ratio_mean"] == pytest.approx(math.exp(0.01), abs=1e-7)


def test_gspo_empty_sequence_is_skipped():
    lp = torch.tensor([[-1.0, -1.0], [0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss, m = policy_loss(lp, lp.detach(), torch.tensor([2.0, 5.0]), mask)
    # Only seq 0 counts: ratio 1, loss -A0 = -2 (the empty one neither adds -5 nor halves the mean).
    assert loss.item() == pytest.approx(-2.0)
    assert m["clip_frac"] == 0.0


def _random_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 2, 7, 1])
    mask = (torch.arange(7) < lengths.unsqueeze(-1)).float()
    lp = (-torch.rand(4, 7, generator=gen) * 3).requires_grad_(True)
    adv = torch.randn(4, generator=gen)
    return lp, mask, adv, gen


def test_gspo_on_policy_ratio_is_one_and_gradient_is_reinforce():
    lp, mask, adv, _ = _random_batch(0)
    loss, m = policy_loss(lp, lp.detach(), adv, mask)
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0 and m["clip_frac"] == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    # On policy the GSPO gradient is that of -mean_i(A_i * mean_t lp_it).
    reference = -(adv * (lp * mask).sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(_grad(loss, lp), _grad(reference, lp))


@pytest.mark.parametrize("per_token_adv", [False, True])
def test_gspo_token_equals_gspo(per_token_adv):
    lp, mask, adv, gen = _random_batch(1)
    old = lp.detach() + 0.3 * torch.randn(4, 7, generator=gen)  # off-policy: some sequences clip
    kwargs = dict(clip_low=0.05, clip_high=0.05)
    loss_seq, m_seq = policy_loss(lp, old, adv, mask, mode="gspo", **kwargs)
    token_adv = adv.unsqueeze(-1).expand(4, 7) if per_token_adv else adv
    loss_tok, _ = policy_loss(lp, old, token_adv, mask, mode="gspo-token", **kwargs)
    assert m_seq["clip_frac"] > 0  # the comparison covers the clipped branch too
    assert loss_tok.item() == pytest.approx(loss_seq.item(), abs=1e-6)
    torch.testing.assert_close(_grad(loss_tok, lp), _grad(loss_seq, lp))


def test_gspo_token_equals_gspo_beyond_log_ratio_clamp():
    # Seq 0's mean log-ratio is 12 > 10 with A < 0 (unclipped branch active): GSPO's clamp gives no gradient.
    lp = torch.tensor([[0.0, 0.0], [-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-12.0, -12.0], [-1.1, -1.9]])
    mask = torch.ones(2, 2)
    adv = torch.tensor([-1.0, 0.5])
    loss_seq, _ = policy_loss(lp, old, adv, mask, mode="gspo", clip_low=0.2, clip_high=0.2)
    loss_tok, _ = policy_loss(lp, old, adv, mask, mode="gspo-token", clip_low=0.2, clip_high=0.2)
    assert loss_tok.item() == pytest.approx(loss_seq.item(), rel=1e-6)
    g_seq, g_tok = _grad(loss_seq, lp), _grad(loss_tok, lp)
    assert torch.all(g_seq[0] == 0)
    torch.testing.assert_close(g_tok, g_seq)


def test_grpo_token_mean_hand_values():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    old = torch.tensor([[-1.0, -2.2], [-0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    # Token ratios: 1, exp(0.2) = 1.2214028, exp(-0.2) = 0.8187308; clip to [0.8, 1.2].
    # t00: A=+1, r=1         -> -1
    # t01: A=+1, r=1.2214 > 1.2, clipped branch active -> -1.2
    # t10: A=-1, r=0.8187 inside -> +0.8187308
    # token-mean          = (-1 - 1.2 + 0.8187308) / 3 = -0.4604231
    # seq-mean-token-mean = (-2.2 / 2 + 0.8187308) / 2 = -0.1406346
    # seq-mean-token-sum  = (-2.2 + 0.8187308) / 2     = -0.6906346
    expected = {"token-mean": -0.4604231, "seq-mean-token-mean": -0.1406346, "seq-mean-token-sum": -0.6906346}
    for aggregation, value in expected.items():
        loss, m = policy_loss(
            lp, old, adv, mask, mode="grpo", clip_low=0.2, clip_high=0.2, aggregation=aggregation
        )
        assert loss.item() == pytest.approx(value, abs=1e-6), aggregation
        assert m["clip_frac"] == pytest.approx(1 / 3) and m["clip_frac_high"] == pytest.approx(1 / 3)
        assert m["clip_frac_low"] == 0.0


def test_clip_fractions_count_only_the_active_side():
    # Mean log-ratios +0.5, -0.5, +0.5, -0.5 -> ratios 1.6487, 0.6065, outside [0.8, 1.2].
    old = torch.tensor([[-0.5], [0.5], [-0.5], [0.5]])
    lp = torch.zeros(4, 1)
    mask = torch.ones(4, 1)
    # seq 0: high ratio, A > 0 -> clipped high (active); seq 1: low ratio, A < 0 -> clipped low (active);
    # seq 2: high ratio, A < 0 -> unclipped branch is the min, not counted; seq 3: low ratio, A > 0 -> same.
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    for mode in ("gspo", "gspo-token", "grpo"):
        _, m = policy_loss(lp, old, adv, mask, mode=mode, clip_low=0.2, clip_high=0.2)
        assert (m["clip_frac"], m["clip_frac_low"], m["clip_frac_high"]) == (0.5, 0.25, 0.25), mode
        assert m["ratio_max"] == pytest.approx(math.exp(0.5), rel=1e-6)


def test_k3_kl_hand_value():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    # d = ref - lp = (-0.5, 1.0); k3 = e^d - d - 1
    #   = (0.6065307 + 0.5 - 1, 2.7182818 - 1 - 1) = (0.1065307, 0.7182818)
    # seq-mean-token-mean -> 0.4124062; A = 0 on policy, so loss = 0.1 * 0.4124062
    loss, m = policy_loss(lp, lp.detach(), torch.zeros(1), torch.ones(1, 2), ref_logprobs=ref, kl_coef=0.1)
    assert m["kl"] == pytest.approx(0.4124062, abs=1e-6)
    assert loss.item() == pytest.approx(0.04124062, abs=1e-7)
    # d k3 / d lp = 1 - e^d; mean over 2 tokens, times 0.1.
    expected = torch.tensor([[1 - math.exp(-0.5), 1 - math.e]]) * 0.1 / 2
    torch.testing.assert_close(_grad(loss, lp), expected)


def test_entropy_bonus_is_subtracted():
    lp = torch.zeros(1, 2)
    entropy = torch.tensor([[1.0, 3.0]])
    loss, m = policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 2), entropy=entropy, entropy_coef=0.01)
    assert m["entropy"] == pytest.approx(2.0)
    assert loss.item() == pytest.approx(-0.02)


def test_bad_arguments_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mode"):
        policy_loss(x, x, torch.zeros(2), x, mode="ppo")
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(x, x, torch.zeros(2), x, aggregation="dapo")
    with pytest.raises(ValueError, match="gspo-token"):
        policy_loss(x, x, torch.zeros(2, 3), x, mode="gspo")


def test_warn_if_misconfigured():
    assert warn_if_misconfigured("gspo", "seq-mean-token-mean") is None
    assert warn_if_misconfigured("gspo-token", "seq-mean-token-mean") is None
    assert warn_if_misconfigured("grpo", "token-mean") is None
    assert "ignores" in warn_if_misconfigured("gspo", "token-mean")
    assert "length" in warn_if_misconfigured("gspo-token", "token-mean")
    assert warn_if_misconfigured("gspo-token", "seq-mean-token-sum") is not None


def test_token_logprobs_temperature_and_shift():
    logits = torch.tensor(
        [[[1.0, 2.0, 3.0], [0.0, 0.0, 4.0], [99.0, -99.0, 0.0]]]
    )  # last row predicts nothing
    ids = torch.tensor([[0, 2, 1]])  # position 0 predicts id 2, position 1 predicts id 1

    def by_hand(row: list[float], target: int, t: float) -> float:
        scaled = [v / t for v in row]
        return scaled[target] - math.log(sum(math.exp(v) for v in scaled))

    for temperature in (1.0, 0.7, 2.0):
        out = token_logprobs(logits, ids, temperature=temperature)
        assert out.shape == (1, 2)
        expected = [by_hand([1.0, 2.0, 3.0], 2, temperature), by_hand([0.0, 0.0, 4.0], 1, temperature)]
        torch.testing.assert_close(out, torch.tensor([expected]))
    # T = 2 on [1, 2, 3], target 2: 1.5 - log(e^0.5 + e^1 + e^1.5)
    #   = 1.5 - log(1.6487213 + 2.7182818 + 4.4816891) = 1.5 - 2.1802697 = -0.6802697
    assert token_logprobs(logits, ids, temperature=2.0)[0, 0].item() == pytest.approx(-0.6802697, abs=1e-6)
    with pytest.raises(ValueError):
        token_logprobs(logits, ids, temperature=0.0)


def test_token_logprobs_matches_log_softmax_and_keeps_grad():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 11, generator=gen, requires_grad=True)
    ids = torch.randint(0, 11, (3, 6), generator=gen)
    out = token_logprobs(logits, ids, temperature=0.8)
    ref = torch.log_softmax(logits[:, :-1] / 0.8, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out, ref)
    assert out.requires_grad


# ---- the sampler's distribution under top-p ----------------------------------------------------------------------
# Probabilities 0.15, 0.5, 0.05, 0.3 over a vocabulary of 4, in shuffled order so the mask has to be put back
# where the tokens are. Ascending: 0.05 (id 2), 0.15 (id 0), 0.3 (id 3), 0.5 (id 1); cumulative 0.05, 0.2, 0.5, 1.
_PROBS = [0.15, 0.5, 0.05, 0.3]


@pytest.mark.parametrize("top_p, kept", [
    (1.0, [True, True, True, True]),
    (0.85, [True, True, False, True]),   # 1 - p = 0.15: drops 0.05 (cum 0.05); 0.15 + 0.3 + 0.5 = 0.95 >= 0.85
    (0.75, [False, True, False, True]),  # 1 - p = 0.25: drops 0.05, 0.15 (cum 0.2); 0.3 + 0.5 = 0.8 >= 0.75
    (0.4, [False, True, False, False]),  # 1 - p = 0.6: only 0.5 is left, and it reaches 0.4
    (0.01, [False, True, False, False]),  # the most likely token is always kept
])
def test_nucleus_mask_keeps_the_smallest_set_reaching_top_p(top_p, kept):
    logits = torch.tensor(_PROBS).log().repeat(2, 1, 1)  # [2, 1, 4]: any leading shape
    assert nucleus_mask(logits, top_p).tolist() == [[kept]] * 2


def test_token_logprobs_renormalise_over_the_nucleus():
    """The engine's processed log-probs: tempered, outside the nucleus dropped, renormalised over the rest."""
    logits = torch.tensor(_PROBS).log().expand(1, 5, 4)
    ids = torch.tensor([[0, 1, 3, 1, 2]])  # targets 1, 3, 1, 2 at positions 0..3
    out = token_logprobs(logits, ids, temperature=1.0, top_p=0.75)
    # Nucleus {1: 0.5, 3: 0.3}, mass 0.8: log(0.5 / 0.8) = -0.4700036, log(0.3 / 0.8) = -0.9808293.
    # Target 2 (p 0.05) lies outside the nucleus: it is kept in the support so its log-prob stays finite,
    # over {1, 3, 2}, mass 0.85: log(0.05 / 0.85) = -2.8332133.
    torch.testing.assert_close(out, torch.tensor([[-0.4700036, -0.9808293, -0.4700036, -2.8332133]]))
    # Temperature first: T = 0.5 squares the probabilities, 0.0225, 0.25, 0.0025, 0.09 (sum 0.365), i.e. 0.061644,
    # 0.684932, 0.006849, 0.246575. top_p 0.9 (1 - p = 0.1): cumulative 0.006849, 0.068493 dropped, 0.315068
    # kept -> nucleus {1, 3}, mass 0.34: log(0.25 / 0.34) = -0.3074847, log(0.09 / 0.34) = -1.3291360.
    out = token_logprobs(logits, ids, temperature=0.5, top_p=0.9)
    torch.testing.assert_close(out[0, :2], torch.tensor([-0.3074847, -1.3291360]))


def test_token_logprobs_top_p_keeps_the_gradient_finite_and_inside_the_nucleus():
    """The gradient of a log-prob flows to the nucleus logits only; a target outside it gives no NaN."""
    logits = torch.tensor(_PROBS).log().expand(1, 3, 4).clone().requires_grad_(True)
    ids = torch.tensor([[0, 1, 2]])  # target 1 (in the nucleus), then 2 (outside it)
    (g,) = torch.autograd.grad(token_logprobs(logits, ids, top_p=0.75).sum(), logits)
    # d log q_1 / d z = onehot(1) - q over the nucleus {1: 0.625, 3: 0.375}; 0 on dropped tokens.
    torch.testing.assert_close(g[0, 0], torch.tensor([0.0, 0.375, 0.0, -0.375]))
    # Target 2 over {1, 2, 3}, mass 0.85: onehot(2) - (0.5, 0.05, 0.3) / 0.85.
    torch.testing.assert_close(g[0, 1], torch.tensor([0.0, -0.5882353, 1 - 0.0588235, -0.3529412]))
    assert torch.isfinite(g).all()


def test_token_entropy_is_the_entropy_of_the_nucleus():
    """Entropy of the distribution the sampler draws from, with a finite gradient that stays in the nucleus."""
    logits = torch.tensor(_PROBS).log().expand(2, 3, 4).clone().requires_grad_(True)
    # Full: -(0.15 ln 0.15 + 0.5 ln 0.5 + 0.05 ln 0.05 + 0.3 ln 0.3) = 1.1421247
    torch.testing.assert_close(token_entropy(logits), torch.full((2, 3), 1.1421247))
    # Nucleus at top_p 0.75: {0.625, 0.375} -> -(0.625 ln 0.625 + 0.375 ln 0.375) = 0.6615632
    ent = token_entropy(logits, top_p=0.75)
    torch.testing.assert_close(ent, torch.full((2, 3), 0.6615632))
    # Temperature first: T = 0.5 gives the nucleus {0.735294, 0.264706} at top_p 0.9 (see above):
    # 0.7352941 * 0.3074847 + 0.2647059 * 1.3291360 = 0.5779218
    torch.testing.assert_close(token_entropy(logits, 0.5, 0.9), torch.full((2, 3), 0.5779218))
    (g,) = torch.autograd.grad(ent.sum(), logits)
    assert torch.isfinite(g).all() and (g[..., [0, 2]] == 0).all() and (g[..., [1, 3]] != 0).all()


def test_token_logprobs_agree_with_the_hf_engines_processed_logprobs():
    """The trainer and the HF rollout engine apply the same temperature and nucleus: on tokens drawn from the
    engine's distribution (random logits) the two log-probs agree."""
    from saferl.engines import processed_logprobs

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 9, 40, generator=gen) * 2
    for temperature, top_p in ((1.0, 0.9), (0.7, 0.5), (1.3, 0.95)):
        engine = processed_logprobs(logits[:, :-1].reshape(-1, 40), temperature, top_p)  # [24, 40]
        drawn = torch.multinomial(engine.exp(), 1, generator=gen).view(3, 8)
        ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), drawn], 1)
        expected = engine.gather(-1, drawn.view(-1, 1)).view(3, 8)
        assert (engine == float("-inf")).any()  # the nucleus really drops tokens
        torch.testing.assert_close(token_logprobs(logits, ids, temperature, top_p), expected)


def _grpo_padded_example():
    # Row 0 has 3 response tokens, row 1 has 2 and one padding position with junk values (4.0 vs -6.0: a
    # log-ratio of 10 that would dominate every mean if it were counted).
    lp = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.5, 4.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -0.5, -1.8], [-0.2, -1.2, -6.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    return lp, old, mask, adv


# Hand computation for _grpo_padded_example, clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]:
# row 0 (A = +2): log-ratios 0.1, 0.0, -0.2 -> ratios 1.1051709, 1.0, 0.8187308, all inside the range
#   per-token L = -2 * r = -2.2103418, -2.0, -1.6374615; sum = -5.8478033; mean = -5.8478033 / 3 = -1.9492678
# row 1 (A = -1): log-ratios 0.0, -0.3 -> ratios 1.0, 0.7408182
#   t0: -(1.0 * -1) = 1.0
#   t1: r = 0.7408 < 0.8 with A < 0: unclipped -0.7408182, clipped -0.8; min = -0.8 (clipped, low side) -> L = 0.8
#   sum = 1.8; mean = 0.9
# seq-mean-token-mean = (-1.9492678 + 0.9) / 2 = -0.5246339
# seq-mean-token-sum  = (-5.8478033 + 1.8) / 2 = -2.0239017
# (token-mean would be (-5.8478033 + 1.8) / 5 = -0.8095607: a different value again)
# clip_frac: 1 of 5 response tokens, on the low side.


def test_grpo_seq_mean_token_mean_hand_value_with_padding():
    """GRPO seq-mean-token-mean on a [2, 3] batch with one padded row: value, clip fractions and gradient."""
    lp, old, mask, adv = _grpo_padded_example()
    loss, m = policy_loss(lp, old, adv, mask, mode="grpo", clip_low=0.2, clip_high=0.28,
                          aggregation="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-0.5246339, abs=1e-6)
    assert m["pg_loss"] == pytest.approx(-0.5246339, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(0.2) and m["clip_frac_low"] == pytest.approx(0.2)
    assert m["clip_frac_high"] == 0.0
    # ratios of the 5 real tokens: 1.1051709 + 1 + 0.8187308 + 1 + 0.7408182 = 4.6647199 -> mean 0.9329440
    assert m["ratio_mean"] == pytest.approx(0.9329440, abs=1e-6)
    assert m["ratio_max"] == pytest.approx(1.1051709, abs=1e-6)
    # d/dlp of an unclipped token = -A * r, weighted 1 / (len_i * B):
    #   row 0 (weight 1/6): -2 * 1.1051709 / 6 = -0.3683903, -2 / 6 = -0.3333333, -2 * 0.8187308 / 6 = -0.2729103
    #   row 1 (weight 1/4): t0 = +1 * 1.0 / 4 = 0.25; t1 clipped -> 0; padding -> 0
    expected = torch.tensor([[-0.3683903, -0.3333333, -0.2729103], [0.25, 0.0, 0.0]])
    torch.testing.assert_close(_grad(loss, lp), expected, atol=1e-6, rtol=0)


def test_grpo_seq_mean_token_sum_hand_value_with_padding():
    """GRPO seq-mean-token-sum on the same batch: per-sequence sums, averaged over the 2 sequences."""
    lp, old, mask, adv = _grpo_padded_example()
    loss, m = policy_loss(lp, old, adv, mask, mode="grpo", clip_low=0.2, clip_high=0.28,
                          aggregation="seq-mean-token-sum")
    assert loss.item() == pytest.approx(-2.0239017, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(0.2) and m["clip_frac_low"] == pytest.approx(0.2)
    # Weight 1/B = 1/2 per token: row 0: -2 * r / 2 = -1.1051709, -1.0, -0.8187308; row 1: 1 / 2 = 0.5, 0, 0
    expected = torch.tensor([[-1.1051709, -1.0, -0.8187308], [0.5, 0.0, 0.0]])
    torch.testing.assert_close(_grad(loss, lp), expected, atol=1e-6, rtol=0)
    # The aggregations really differ on this batch (a length-weighting bug would make two of them coincide).
    token_mean, _ = policy_loss(lp, old, adv, mask, mode="grpo", clip_low=0.2, clip_high=0.28,
                                aggregation="token-mean")
    assert token_mean.item() == pytest.approx(-0.8095607, abs=1e-6)


def test_gspo_token_per_token_advantages_hand_value():
    """GSPO-token with [B, T] advantages: every token's ratio is its sequence's s_i, the min-of-two is taken per
    token with that token's advantage, then seq-mean-token-mean; padding (advantage 9) is ignored."""
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.4, -0.9, 7.0]], requires_grad=True)
    old = torch.tensor([[-1.3, -2.0, -0.5], [-0.3, -0.9, -4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0], [0.5, -0.5, 9.0]])
    # Clip range [1 - 0.05, 1 + 0.05] = [0.95, 1.05].
    # row 0: log-ratios 0.3, 0, 0 -> mean 0.1 -> s0 = exp(0.1) = 1.1051709 (> 1.05)
    #   A = +1: min(1.1051709, 1.05) = 1.05 (clipped, high)     -> L = -1.05
    #   A = -1: min(-1.1051709, -1.05) = -1.1051709 (unclipped) -> L = +1.1051709
    #   A = +2: min(2.2103418, 2.1) = 2.1 (clipped, high)       -> L = -2.1
    #   token mean = (-1.05 + 1.1051709 - 2.1) / 3 = -2.0448291 / 3 = -0.6816097
    # row 1: log-ratios -0.1, 0 (padding excluded) -> mean -0.05 -> s1 = exp(-0.05) = 0.9512294 (inside)
    #   A = +0.5 -> L = -0.4756147; A = -0.5 -> L = +0.4756147; token mean = 0
    # loss = (-0.6816097 + 0) / 2 = -0.3408048
    loss, m = policy_loss(lp, old, adv, mask, mode="gspo-token", clip_low=0.05, clip_high=0.05,
                          aggregation="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-0.3408048, abs=1e-6)
    # clip fractions over the 5 response tokens: 2 clipped high, none low
    assert m["clip_frac"] == pytest.approx(0.4) and m["clip_frac_high"] == pytest.approx(0.4)
    assert m["clip_frac_low"] == 0.0
    # ratio_mean = (3 * 1.1051709 + 2 * 0.9512294) / 5 = (3.3155128 + 1.9024588) / 5 = 1.0435943
    assert m["ratio_mean"] == pytest.approx(1.0435943, abs=1e-6)
    assert m["ratio_max"] == pytest.approx(1.1051709, abs=1e-6)
    # Gradient: d s_it / d lp_it = s_i (own token only); clipped tokens get 0.
    #   row 0 (weight 1/6): t1: -A * s0 / 6 = 1.1051709 / 6 = 0.1841952; t0, t2 clipped -> 0
    #   row 1 (weight 1/4): t0: -0.5 * 0.9512294 / 4 = -0.1189037; t1: +0.1189037; padding -> 0
    expected = torch.tensor([[0.0, 0.1841952, 0.0], [-0.1189037, 0.1189037, 0.0]])
    torch.testing.assert_close(_grad(loss, lp), expected, atol=1e-6, rtol=0)
