"""Token-level penalties on implausible sampled tokens (pure): the unlikelihood term (Welleck et al. 2019,
arXiv 1908.04319, "Neural text generation with unlikelihood training") and the implausible-mass penalty.

Owns which sampled response tokens count as implausible and the losses that lower their probability; the
trainer adds `unlikelihood_coef * UL + implausible_mass_coef * M` to the policy loss
(`PolicyTrainer.train_step`). With B sequences, T response positions, lp the current policy's log-prob of the
sampled token and ref the frozen starting policy's:

    flagged_it = mask_it * [ref_it < threshold]                  an implausible token
    UL         = (1 / N) * sum_it flagged_it * -log(1 - p_it)      p_it = exp(lp_it)
    N          = the flagged tokens of the whole minibatch (all its micro-batches and ranks), so the
                 micro-batches' terms add up to the minibatch's mean over its flagged tokens
    M          = (1 / B) * sum_it flagged_it * lp_it              B: the minibatch's sequences

UL's gradient on a flagged token is p / (1 - p) * grad lp: about p itself for the rare slips RL leaves (the
toy policy gives them p ~ 0.002), so it barely moves them. M is the score-function estimate of the expected
number of implausible tokens per answer: for y_t sampled from pi, E[flagged_t * grad log pi(y_t)] =
grad sum_{v implausible} pi(v), the gradient of the implausible probability mass at position t. Its push per
sampled slip is grad lp whatever p is (an on-policy estimate: exact for the first minibatch, slightly
off-policy for the later ones, as the policy-gradient term).

Why: the fluency gate (reward.rules.fluency_min_logprob) caps the *answer's* reward, and GSPO's sequence ratio
spreads that one advantage over every token of it, so the few tokens that made the answer implausible get
little direct signal. This term pushes exactly those tokens down, whatever the answer's advantage.

Choices and shortcuts:
- "Implausible" is the fluency gate's definition (one threshold, reward.rules.fluency_min_logprob), read from
  the reference log-probs the driver already computes for the gate (`ScoredRollout.reference_token_logprobs`).
- p is the sampler's probability (temperature, top-p: the `lp` the policy loss uses), the one that produced
  the token; ref is the reference's own distribution (temperature 1), as for the gate.
- 1 - p is clamped below at 1e-5 (as Welleck et al.'s code), so a token the policy is sure of adds at most
  -log(1e-5) = 11.5 and no gradient instead of an unbounded one.
- A mean over the flagged tokens, not over all tokens: the push per implausible token does not shrink as they
  become rare.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MIN_ONE_MINUS_P = 1e-5


def implausible_mask(reference: Sequence[Sequence[float]], rows: Sequence[int], width: int,
                     threshold: float) -> torch.Tensor:
    """Which response tokens of the chosen rows are implausible to the reference, in the trainer's layout.

    Args:
        reference: per sequence of the batch, its response tokens' log-probs under the starting policy.
        rows: the batch rows of a micro-batch, in its order (row b of the result is `reference[rows[b]]`).
        width: C, the micro-batch's response width; token t of a response sits in column t.
        threshold: a token whose reference log-prob is strictly below this is implausible.

    Returns:
        [len(rows), C] bool; False past each response's end. (AND it with the response mask for dummy rows.)
    """
    out = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        values = torch.tensor(list(reference[row][:width]), dtype=torch.float64)
        out[b, : len(values)] = values < threshold
    return out


def count_implausible(reference: Sequence[Sequence[float]], rows: Sequence[int], threshold: float) -> int:
    """N: the implausible tokens of the chosen rows (a minibatch's, over every rank)."""
    return sum(lp < threshold for row in rows for lp in reference[row])


def implausible_mass_loss(logprobs: torch.Tensor, flagged: torch.Tensor, sequences: float) -> torch.Tensor:
    """The implausible-mass penalty of one micro-batch: the sum of its flagged tokens' log-probs over the
    minibatch's number of sequences (minimising it lowers the expected implausible tokens per answer).

    Args:
        logprobs: [B, T] log-probs of the sampled response tokens under the current policy (with grad).
        flagged: [B, T] bool (or 0/1), the implausible tokens; padding must be False.
        sequences: the minibatch's number of sequences (all its micro-batches and ranks); below 1 counts as 1.

    Returns:
        [] scalar, differentiable; 0 with no flagged token. Its value is not a mass (a sum of log-probs,
        <= 0); its gradient is the estimate of one's.
    """
    if logprobs.shape != flagged.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and flagged {tuple(flagged.shape)} must both be "
                         "[B, T]")
    return (logprobs.float() * flagged.to(torch.float32)).sum() / max(1.0, float(sequences))


def unlikelihood_loss(logprobs: torch.Tensor, flagged: torch.Tensor, count: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unlikelihood term of one micro-batch: its flagged tokens' -log(1 - p), summed, divided by `count`.

    Args:
        logprobs: [B, T] log-probs of the sampled response tokens under the current policy (with grad).
        flagged: [B, T] bool (or 0/1), the implausible tokens; padding must be False.
        count: N, the number of flagged tokens the mean is over (the minibatch's); values below 1 count as 1.

    Returns:
        ([] scalar, differentiable; 0 with no flagged token), [B, T] per-token -log(1 - p) on flagged tokens
        and 0 elsewhere (detached, for metrics).
    """
    if logprobs.shape != flagged.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and flagged {tuple(flagged.shape)} must both be "
                         "[B, T]")
    one_minus_p = (-torch.expm1(logprobs.float())).clamp_min(_MIN_ONE_MINUS_P)  # 1 - p, accurate near p = 1
    per_token = -torch.log(one_minus_p) * flagged.to(torch.float32)
    return per_token.sum() / max(1.0, float(count)), per_token.detach()
