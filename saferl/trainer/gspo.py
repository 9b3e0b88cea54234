"""Pure policy-gradient losses over tensors: GSPO, GSPO-token and GRPO (PPO-clip), plus the sampler's token
log-probs and entropy.

Owns the maths of one policy update and nothing else: no model, optimizer or batch object. Shapes use
B = sequences in the (mini)batch and T = response positions; `mask` is 1.0 on response tokens, 0.0 on padding.

GSPO (Zheng et al. 2025, arXiv 2507.18071), with |y_i| = sum_t mask_it:

    s_i   = exp( clamp( (1/|y_i|) sum_t mask_it * (lp_it - old_it), -c, c ) )        sequence ratio
    L_i   = -min( s_i * A_i , clip(s_i, 1 - eps_low, 1 + eps_high) * A_i )
    L     = mean over non-empty sequences of L_i

GSPO-token: s_it = sg[s_i] * exp(lp_it - sg[lp_it]) with per-token loss as above and the chosen aggregation;
with A_it = A_i and `seq-mean-token-mean` it equals GSPO in value, clipping and gradient.

GRPO: token ratio r_it = exp(lp_it - old_it), the same min-of-two loss per token, then the chosen aggregation.

Shortcuts and choices:
- Sequences with no response token (mask all zero) are left out of every mean over sequences, so they neither
  dilute the loss nor divide by zero.
- The log-ratio is clamped at +-`log_ratio_clamp` in every mode (verl uses 10); outside the clamp the
  sequence (GSPO) or token (GRPO) carries no gradient. GSPO-token reproduces that gate so the equivalence
  holds there too.
- Optional k3 KL to a reference policy and an entropy bonus use the same aggregation as the policy term
  (`seq-mean-token-mean` for `gspo`). Both default to off: GSPO is run with beta = 0.
- pi is the distribution the rollout engine samples from: logits / temperature, renormalised over the top-p
  nucleus (`nucleus_mask`, vLLM's rule), so the policy optimised is the behaviour policy. The nucleus is chosen
  on the trainer's own logits (no gradient through the choice); a token whose cumulative mass lies within
  float rounding of the boundary may fall on the other side than in the engine, which then moves that
  position's normaliser by the token's probability.
"""

from __future__ import annotations

import torch

from saferl.engines import nucleus_mask  # the sampler's nucleus: pi is the behaviour policy

MODES = ("gspo", "gspo-token", "grpo")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

# The k3 estimator exponentiates ref - lp; clamp that difference so one wild token cannot overflow (verl: 20).
_KL_LOG_CLAMP = 20.0


def warn_if_misconfigured(mode: str, aggregation: str) -> str | None:
    """Return a warning for a known-wrong mode/aggregation pair, else None. The caller logs it.

    Sequence-level ratios are length-normalised; `token-mean` and `seq-mean-token-sum` re-weight sequences by
    length and undo that (huggingface/trl#3823, alibaba/ROLL#165, verl-project/verl#3545).
    """
    if mode not in ("gspo", "gspo-token") or aggregation == "seq-mean-token-mean":
        return None
    if mode == "gspo":
        return (
            f"mode='gspo' ignores aggregation={aggregation!r} and always averages per sequence; "
            "set aggregation='seq-mean-token-mean' to say what actually runs"
        )
    return (
        f"mode='gspo-token' with aggregation={aggregation!r} weights sequences by length and undoes GSPO's "
        "length normalisation; use 'seq-mean-token-mean'"
    )


def aggregate(values: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Reduce per-token values to a scalar.

    Args:
        values: [B, T] per-token values.
        mask: [B, T] 1.0 on response tokens, 0.0 on padding.
        aggregation: `token-mean` (sum over all tokens / number of tokens), `seq-mean-token-mean` (mean over
            tokens within each sequence, then over sequences) or `seq-mean-token-sum` (sum within each
            sequence, then mean over sequences).

    Returns:
        [] scalar. Sequences with no response token are excluded from the mean over sequences.
    """
    mask = mask.to(values.dtype)
    if aggregation == "token-mean":
        return (values * mask).sum() / mask.sum().clamp_min(1.0)
    lengths = mask.sum(dim=-1)  # [B]
    seq_sums = (values * mask).sum(dim=-1)  # [B]
    if aggregation == "seq-mean-token-mean":
        per_seq = seq_sums / lengths.clamp_min(1.0)
    elif aggregation == "seq-mean-token-sum":
        per_seq = seq_sums
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    return _mean_over_sequences(per_seq, lengths)


def _mean_over_sequences(per_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of per_seq [B] over sequences with lengths [B] > 0; returns a [] scalar."""
    nonempty = (lengths > 0).to(per_seq.dtype)
    return (per_seq * nonempty).sum() / nonempty.sum().clamp_min(1.0)


def _clipped_objective(
    ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO min-of-two loss, elementwise, over ratio and adv of one shape S.

    Returns (loss, clipped_low, clipped_high), each of shape S.

    A branch counts as clipped only where the clipped term is the active one (strictly smaller objective):
    above 1 + clip_high with A > 0, or below 1 - clip_low with A < 0.
    """
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    active = clipped < unclipped
    return loss, active & (adv < 0), active & (adv > 0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "gspo",
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    aggregation: str = "seq-mean-token-mean",
    log_ratio_clamp: float = 10.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss in GSPO, GSPO-token or GRPO form.

    Args:
        logprobs: [B, T] log-probs of the response tokens under the current policy (with grad).
        old_logprobs: [B, T] log-probs under the policy that sampled them (pi_old); treated as constants.
        advantages: [B], or [B, T] per-token advantages for `gspo-token` and `grpo`.
        mask: [B, T] 1.0 on response tokens, 0.0 on padding.
        mode: `gspo`, `gspo-token` or `grpo`.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (GSPO paper: 3e-4 / 4e-4;
            GRPO callers typically pass 0.2 / 0.2 or 0.2 / 0.28).
        aggregation: reduction for token-level modes (see `aggregate`); `gspo` always averages per sequence.
        log_ratio_clamp: the (sequence or token) log-ratio is clamped to [-c, c] before exponentiating.
        ref_logprobs: [B, T] reference-policy log-probs; with `kl_coef` adds kl_coef * k3 KL.
        kl_coef: weight of the k3 KL term (0 = off, the GSPO setting).
        entropy: [B, T] per-token policy entropy; with `entropy_coef` subtracts entropy_coef * entropy.
        entropy_coef: weight of the entropy bonus (0 = off; negative: a penalty, which sharpens the policy).

    Returns:
        ([] scalar loss to minimise, metrics). Metrics: pg_loss, clip_frac, clip_frac_low, clip_frac_high
        (fractions of sequences for `gspo`, of response tokens otherwise), ratio_mean, ratio_max, and kl /
        entropy when given.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
            f"{tuple(mask.shape)} must all be [B, T]"
        )
    if mode == "gspo" and advantages.dim() != 1:
        raise ValueError("mode='gspo' takes one advantage per sequence ([B]); use 'gspo-token' for [B, T]")

    mask = mask.to(logprobs.dtype)
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach().to(logprobs.dtype)
    lengths = mask.sum(dim=-1)  # [B]
    token_mask = mask.bool()
    agg = "seq-mean-token-mean" if mode == "gspo" else aggregation

    if mode == "grpo":
        log_ratio = (logprobs - old_logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)  # [B, T]
        ratio = torch.exp(log_ratio)
    else:
        seq_log_ratio = ((logprobs - old_logprobs) * mask).sum(dim=-1) / lengths.clamp_min(1.0)  # [B]
        clamped = seq_log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
        if mode == "gspo":
            ratio = torch.exp(clamped)  # [B]
        else:
            # s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)]: value s_i, gradient s_i * grad lp_t. Where the clamp is
            # active GSPO's exp(clamp(.)) has zero gradient, so the token term is zeroed there too.
            inside = (seq_log_ratio.detach().abs() <= log_ratio_clamp).to(logprobs.dtype)  # [B]
            token_term = (logprobs - logprobs.detach()) * inside.unsqueeze(-1)
            ratio = torch.exp(clamped.detach().unsqueeze(-1) + token_term)  # [B, T]

    if mode == "gspo":
        per_seq, low, high = _clipped_objective(ratio, advantages, clip_low, clip_high)
        pg_loss = _mean_over_sequences(per_seq, lengths)
        counted = lengths > 0  # [B]
        ratio_values = ratio.detach()[counted]
    else:
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
        per_token, low, high = _clipped_objective(ratio, adv.expand_as(ratio), clip_low, clip_high)
        pg_loss = aggregate(per_token, mask, agg)
        counted = token_mask  # [B, T]
        ratio_values = ratio.detach()[counted]

    n_counted = max(int(counted.sum()), 1)
    metrics = {
        "pg_loss": float(pg_loss.detach()),
        "clip_frac": float((low | high)[counted].sum()) / n_counted,
        "clip_frac_low": float(low[counted].sum()) / n_counted,
        "clip_frac_high": float(high[counted].sum()) / n_counted,
        "ratio_mean": float(ratio_values.mean()) if ratio_values.numel() else 1.0,
        "ratio_max": float(ratio_values.max()) if ratio_values.numel() else 1.0,
    }

    loss = pg_loss
    if ref_logprobs is not None:
        # k3 estimator of KL(pi || ref) (Schulman): unbiased, always >= 0, low variance.
        diff = (ref_logprobs.detach() - logprobs).clamp(-_KL_LOG_CLAMP, _KL_LOG_CLAMP)
        kl = aggregate(torch.exp(diff) - diff - 1.0, mask, agg)
        metrics["kl"] = float(kl.detach())
        loss = loss + kl_coef * kl
    if entropy is not None:
        ent = aggregate(entropy, mask, agg)
        metrics["entropy"] = float(ent.detach())
        loss = loss - entropy_coef * ent
    return loss, metrics


def sampler_scores(logits: torch.Tensor, targets: torch.Tensor | None, temperature: float = 1.0, top_p: float = 1.0,
                   entropy: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Log-probs of `targets` and entropy under the sampler's distribution, one position per row: the definition
    that `token_logprobs`, `token_entropy` and the chunked LM head (`trainer.logprobs`) compute.

    Args:
        logits: [N, V] logits of N positions (any float dtype; computed in float32).
        targets: [N] the token each position is scored on, or None for entropy alone.
        temperature: the sampler's temperature; logits are divided by it first.
        top_p: the sampler's nucleus mass; tokens outside the nucleus (`nucleus_mask`) get probability 0. The
            log-prob's support also keeps the target: where this forward's rounding puts a sampled token just
            outside the nucleus the engine saw, its log-prob must stay finite (-inf would make the ratio NaN).
            The entropy is that of the nucleus alone.
        entropy: whether to compute the entropy.

    Returns:
        ([N] float32 log-probs or None, [N] float32 entropy or None), differentiable.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    keep = nucleus_mask(scaled.detach(), top_p) if top_p < 1.0 else None
    lp = ent = None
    if targets is not None:
        column = targets.unsqueeze(-1)  # [N, 1]
        row = scaled if keep is None else scaled.masked_fill(~keep.scatter(-1, column, True), float("-inf"))
        lp = row.gather(-1, column).squeeze(-1) - torch.logsumexp(row, dim=-1)
    if entropy:
        if keep is None:
            logp = torch.log_softmax(scaled, dim=-1)
            ent = -(logp.exp() * logp).sum(-1)
        else:
            logp = torch.log_softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
            # Outside the nucleus p log p = 0 * -inf: count it as 0, which also keeps the gradient finite.
            ent = -(logp.exp() * logp.masked_fill(~keep, 0.0)).sum(-1)
    return lp, ent


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0,
                   top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of the actual next tokens under the sampler's distribution: tempered logits, renormalised over
    the top-p nucleus (`sampler_scores`). Together these give the processed behaviour log-probs vLLM reports
    (`logprobs_mode="processed_logprobs"`), so pi_old and pi are the policy that sampled.

    Args:
        logits: [B, T, V] model outputs for input_ids; position t predicts input_ids[:, t + 1].
        input_ids: [B, T] token ids.
        temperature, top_p: the sampler's (see `sampler_scores`).

    Returns:
        [B, T - 1] float32 log p(input_ids[:, t + 1] | input_ids[:, :t + 1]).
    """
    # One row at a time: peak extra memory is one [T, V] float32 slab instead of [B, T, V].
    return torch.stack([sampler_scores(row[:-1], ids[1:], temperature, top_p, entropy=False)[0]
                        for row, ids in zip(logits, input_ids, strict=True)])


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Per-position entropy of the sampler's distribution: the policy that `token_logprobs` scores.

    Args:
        logits: [B, T, V] model outputs.
        temperature, top_p: as in `token_logprobs`.

    Returns:
        [B, T] float32 entropy, differentiable.
    """
    # One [T, V] slab at a time, as in token_logprobs (the nucleus sort doubles it).
    return torch.stack([sampler_scores(row, None, temperature, top_p)[1] for row in logits])
