"""The LM-head end of the update: token log-probs and entropy of the sampler's distribution straight from the
policy's last hidden states, a chunk of positions at a time.

Owns `head_scores`, which the trainer calls on the N scored positions of a micro-batch (those whose next token
is a response token): `hidden [N, H]` and the output layer give, per position, the log-prob of its target and the
entropy, under the sampler's temperature and top-p nucleus: exactly `gspo.sampler_scores` of the logits (the
definition, which materialises [N, V] and stays the reference of the tests).

For a plain linear head (`weight [V, H]`) a custom autograd function (`ChunkedHeadScores`, the scheme of Liger's
and TRL's chunked losses) never holds more than one [chunk, V] float32 slab of logits and one of exponentials:

    forward   per chunk: z = h W^T / T (one LM-head matmul); keep log Z = logsumexp z and H = log Z - sum_v p_v z_v
              (the entropy costs one dot product per position from the same slab); lp = z_target - log Z
    backward  per chunk: recompute z (the price of the memory: 4 LM-head matmuls instead of 3; when one chunk
              holds all N positions the forward keeps its slab instead and the backward reuses it), then in place
              dz = g_lp (onehot - p) - g_H p (log p + H), divided by T, and dh = dz W, dW += dz^T h (float32)

The entropy's gradient terms run only when the entropy reached the loss (g_H is None otherwise), and dW only when
the head is trained. Shortcuts: the top-p path (nucleus by `engines.nucleus_mask`, recomputed in the backward
from the same matmul of the same shape, hence the same bits) forms the masked slabs plainly, without the in-place
economies. Any other head (a LoRA-wrapped one, or one partitioned by ZeRO-3) is called as a module in chunks under
activation checkpointing: the same memory bound through autograd, slower.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from saferl.engines import nucleus_mask
from saferl.trainer.gspo import sampler_scores

# Positions per chunk: a [chunk, V] float32 slab of about 32 MB (in the L3 cache of a server CPU; larger chunks
# run no faster, smaller ones make the LM-head matmul less efficient).
CHUNK_ELEMENTS = 1 << 23


def chunk_rows(vocab: int) -> int:
    """Positions per chunk for a vocabulary of `vocab` tokens."""
    return max(1, CHUNK_ELEMENTS // vocab)


def head_scores(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float = 1.0,
                top_p: float = 1.0, *, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-prob of `targets` and entropy of the sampler's distribution over `head(hidden)`.

    Args:
        hidden: [N, H] last hidden states (the output layer's input) of the scored positions.
        head: the output layer; a plain `nn.Linear` takes the fused path when `fused`.
        targets: [N] the token each position predicts.
        temperature, top_p: the sampler's (see `gspo.sampler_scores`).
        fused: False to call `head` as a module in checkpointed chunks (needed where its weight is not a plain
            tensor, e.g. partitioned by ZeRO-3).

    Returns:
        ([N] float32 log-probs, [N] float32 entropy), both differentiable.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if fused and type(head) is torch.nn.Linear:
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        return ChunkedHeadScores.apply(hidden, head.weight, head.bias, targets, temperature, top_p, dtype)
    return _module_scores(hidden, head, targets, temperature, top_p)


def _module_scores(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float,
                   top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`head_scores` for any output module: chunks recomputed in the backward by activation checkpointing."""
    size = chunk_rows(head.out_features)  # nn.Linear's and peft's LoRA layers' (weight may be a ZeRO-3 stub)

    def chunk(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sampler_scores(head(h), t, temperature, top_p)

    parts = [checkpoint(chunk, hidden[i: i + size], targets[i: i + size], use_reentrant=False)
             if torch.is_grad_enabled() else chunk(hidden[i: i + size], targets[i: i + size])
             for i in range(0, hidden.shape[0], size)]
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([lp for lp, _ in parts]), torch.cat([ent for _, ent in parts])


def _logits(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            inv_t: float) -> torch.Tensor:
    """z = (h W^T + b) / T into the float32 slab `out` [c, V] (the matmul in the inputs' dtype)."""
    if h.dtype == torch.float32:
        torch.mm(h, weight.t(), out=out)
    else:
        out.copy_(torch.mm(h, weight.t()))  # bf16 logits, upcast: as autocast's LM head, then .float()
    if bias is not None:
        out.add_(bias.float())
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out


class ChunkedHeadScores(torch.autograd.Function):
    """(log-probs [N], entropy [N]) of `hidden @ weight.T` (+ bias) at temperature T and top-p, chunked over the
    N positions; see the module docstring for the forward and backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                temperature: float, top_p: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        size = min(max(n, 1), chunk_rows(vocab))
        inv_t = 1.0 / temperature
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
            ent, log_z = torch.empty_like(lp), torch.empty_like(lp)
            log_z_lp = torch.empty_like(lp) if top_p < 1.0 else log_z  # the log-prob's own support under top-p
            z_buf = torch.empty(size, vocab, dtype=torch.float32, device=hidden.device)
            e_buf = torch.empty_like(z_buf)
            # One chunk holds every position: its logits stay for the backward (which then skips the matmul
            # that recomputes them), so the forward works on a copy of them (`s_buf`) instead of in place.
            reuse = 0 < n <= size and any(ctx.needs_input_grad[:3])
            s_buf = torch.empty_like(z_buf) if reuse else z_buf
            for i in range(0, n, size):
                j = min(n, i + size)
                z, e, t = _logits(z_buf[: j - i], h[i:j], w, b, inv_t), e_buf[: j - i], targets[i:j, None]
                if top_p < 1.0:
                    if reuse:
                        z = s_buf.copy_(z)
                    keep = nucleus_mask(z, top_p)
                    z_lp = z.masked_fill(~keep.scatter(-1, t, True), float("-inf"))
                    log_z_lp[i:j] = torch.logsumexp(z_lp, -1)
                    lp[i:j] = z.gather(-1, t).squeeze(-1) - log_z_lp[i:j]
                    z.masked_fill_(~keep, float("-inf"))
                    log_z[i:j] = torch.logsumexp(z, -1)
                    logp = z.sub_(log_z[i:j, None])
                    torch.exp(logp, out=e)
                    ent[i:j] = -torch.linalg.vecdot(e, logp.masked_fill_(~keep, 0.0))
                    continue
                top = z.amax(-1, keepdim=True)
                z = torch.sub(z, top, out=s_buf[: j - i])  # in place unless `reuse`
                torch.exp(z, out=e)
                total = e.sum(-1)
                log_total = total.log()
                lp[i:j] = z.gather(-1, t).squeeze(-1) - log_total
                log_z[i:j] = top.squeeze(-1) + log_total
                # H = -sum p log p = log S - sum e z / S, with z shifted by its max and S = sum e.
                ent[i:j] = log_total - torch.linalg.vecdot(e, z) / total
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z_lp, ent)
        ctx.args = (temperature, top_p, dtype, size)
        ctx.slabs = (z_buf, e_buf) if reuse else None  # the logits [n, V] and a scratch slab
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None):
        hidden, weight, bias, targets, log_z, log_z_lp, ent = ctx.saved_tensors
        temperature, top_p, dtype, size = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_lp is None and g_ent is None:
            return None, None, None, None, None, None, None
        n, vocab = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / temperature
        # dz is linear in (g_lp, g_H): scale them by 1/T once instead of the [c, V] slab.
        g_lp = None if g_lp is None else g_lp.float() * inv_t
        g_ent = None if g_ent is None else g_ent.float() * inv_t
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(vocab, hidden.shape[1], dtype=torch.float32, device=hidden.device) \
                if need_w else None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_b else None
            slabs, ctx.slabs = ctx.slabs, None  # overwritten below: a second backward recomputes
            if slabs is None:
                z_buf = torch.empty(min(max(n, 1), size), vocab, dtype=torch.float32, device=hidden.device)
                slabs = (None, torch.empty_like(z_buf))
            p_buf = slabs[1]
            for i in range(0, n, size):
                j = min(n, i + size)
                # The forward's logits when it kept them: the same matmul of the same shape, the same bits.
                z = slabs[0] if slabs[0] is not None else _logits(z_buf[: j - i], h[i:j], w, b, inv_t)
                p, t = p_buf[: j - i], targets[i:j, None]
                if top_p < 1.0:
                    dz = _top_p_grad(z, t, top_p, log_z[i:j], log_z_lp[i:j], ent[i:j],
                                     None if g_lp is None else g_lp[i:j], None if g_ent is None else g_ent[i:j])
                else:
                    logp = z.sub_(log_z[i:j, None])
                    torch.exp(logp, out=p)
                    if g_ent is not None:
                        # dz = -p (g_lp + g_H (log p + H)) (+ g_lp at the target, below)
                        logp.add_(ent[i:j, None]).mul_(-g_ent[i:j, None])
                        if g_lp is not None:
                            logp.sub_(g_lp[i:j, None])
                        dz = logp.mul_(p)
                    else:
                        dz = p.mul_(-g_lp[i:j, None])
                    if g_lp is not None:
                        dz.scatter_add_(-1, t, g_lp[i:j, None])
                if need_h:
                    grad_h[i:j] = torch.mm(dz.to(dtype), w).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(dz.t(), h[i:j].float())
                if need_b:
                    grad_b.add_(dz.sum(0))
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _top_p_grad(z: torch.Tensor, t: torch.Tensor, top_p: float, log_z: torch.Tensor, log_z_lp: torch.Tensor,
                ent: torch.Tensor, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None) -> torch.Tensor:
    """dz [c, V] under top-p: the log-prob's softmax is over the nucleus plus its target, the entropy's over the
    nucleus; zero outside them. g_lp, g_ent are already divided by T."""
    keep = nucleus_mask(z, top_p)
    dz = torch.zeros_like(z)
    if g_lp is not None:
        support = keep.scatter(-1, t, True)
        q = (z - log_z_lp[:, None]).exp_().masked_fill_(~support, 0.0)
        dz.sub_(q.mul_(g_lp[:, None])).scatter_add_(-1, t, g_lp[:, None])
    if g_ent is not None:
        logp = (z - log_z[:, None]).masked_fill_(~keep, -math.inf)
        p = logp.exp()
        dz.sub_(p.mul_(logp.masked_fill_(~keep, 0.0).add_(ent[:, None])).mul_(g_ent[:, None]))
    return dz
