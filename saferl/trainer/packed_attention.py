"""Attention over `batching.pack_batch`'s layout: each prompt once, each response against its prompt and itself.

Owns the `saferl_packed` attention implementation the trainer's models run with. A packed row holds a prompt and
the responses that share it; a response may attend to its prompt and to its own tokens before it, never to
another response. A block mask over the whole row would compute every query against every key of the row
(SDPA computes masked pairs too), the square of a group's total length. Instead the row's positions are cut
into segments, a prompt (queries: its tokens; keys: its tokens) or a response (queries: its tokens; keys: its
prompt's tokens, then its own), gathered into one [S, Qmax] x [S, Kmax] batch, and run through one SDPA call
with a causal-per-segment mask; outputs go back to their positions. The pairs computed are what each sequence
would cost alone, so packing saves the prompt copies and adds no attention.

The layout travels as the model's `attention_mask` in the dict form HF uses for prepared masks
(`{"full_attention": PackedAttention}`), so model, DDP, DeepSpeed and peft pass it through unchanged; with any
other mask the implementation is HF's SDPA (the model stays usable for plain calls).
"""

from __future__ import annotations

import dataclasses

import torch

NAME = "saferl_packed"


@dataclasses.dataclass
class PackedAttention:
    """Segments of a packed batch of R rows of width L (flat positions r * L + column; R * L is a dummy).

    query_index [S, Qmax]: each segment's query positions (padding: the dummy); key_index [S, Kmax]: its key
    positions, the prompt's then (for a response) its own; allowed [S, 1, Qmax, Kmax] bool: query i of a segment
    may see key j (causal within the segment; a padding query sees key 0 only, its output discarded).
    The gathers read `query_source` [S, Qmax] (query_index with padding reading position 0) and
    `position_source` [R * L] (where each position's output lies in the flattened [S, Qmax]: every position
    is the query of exactly one segment).
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    allowed: torch.Tensor
    query_source: torch.Tensor
    position_source: torch.Tensor
    _biases: dict[torch.dtype, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def to(self, device: torch.device) -> PackedAttention:
        return PackedAttention(*(t.to(device) for t in (self.query_index, self.key_index, self.allowed,
                                                         self.query_source, self.position_source)))

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """`allowed` as SDPA's additive mask (0 where allowed, -inf elsewhere) in `dtype`: the float mask SDPA
        turns a boolean one into, made once per layout instead of in every layer's forward and backward."""
        if dtype not in self._biases:
            self._biases[dtype] = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device
                                              ).masked_fill_(~self.allowed, float("-inf"))
        return self._biases[dtype]


def packed_segments(groups: list[tuple[int, int, list[tuple[int, int]]]], length: int) -> PackedAttention:
    """The segments of a packed row of `length` positions (flat index R * L + column; one row here).
    `groups`: (prompt start, prompt length, [(response start, response length)]) per prompt."""
    # Per segment: its queries start at `start` (`count` of them) and its keys are `shared` prompt positions
    # from `prefix`, then its own queries. A prompt shares nothing (its keys are its queries).
    segments = []
    for start, n_prompt, responses in groups:
        segments += [(start, n_prompt, start, 0)] + [(at, n, start, n_prompt) for at, n in responses]
    table = torch.tensor(segments, dtype=torch.long).view(-1, 4)  # [S, 4]: start, count, prefix, shared
    at, count, prefix, shared = (table[:, c, None] for c in range(4))  # each [S, 1]
    n_keys = shared + count
    q_max = max(1, int(count.max()) if segments else 1)
    k_max = max(1, int(n_keys.max()) if segments else 1)
    i, j = torch.arange(q_max), torch.arange(k_max)
    real_query = i < count  # [S, Qmax]
    query_index = torch.where(real_query, at + i, length)  # padding: the dummy position
    own = j - shared  # [S, Kmax]: index into the segment's own queries
    key_index = torch.where(j < shared, prefix + j, torch.where(j < n_keys, at + own, 0))
    # Query i of a segment is key shared + i: it sees keys 0 .. shared + i (causal within the segment); a
    # padding query sees key 0 only, so no row is all masked (NaN).
    sees = (j[None, None, :] <= (shared + i)[:, :, None]) & (j < n_keys)[:, None, :]
    allowed = torch.where(real_query[:, :, None], sees, (j == 0)[None, None, :])
    positions = query_index[real_query]
    if not torch.equal(torch.bincount(positions, minlength=length), torch.ones(length, dtype=torch.long)):
        raise ValueError("packed_segments: every position must be the query of exactly one segment")
    position_source = torch.empty(length, dtype=torch.long)
    position_source[positions] = torch.arange(real_query.numel()).view(real_query.shape)[real_query]
    return PackedAttention(query_index, key_index, allowed.unsqueeze(1), torch.where(real_query, query_index, 0),
                           position_source)


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: object, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs: object) -> tuple[torch.Tensor, None]:
    """HF attention interface: query [R, Hq, L, d], key / value [R, Hkv, L, d] -> output [R, L, Hq, d]."""
    if not isinstance(attention_mask, PackedAttention):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layout = attention_mask
    n_rows, n_heads, width, dim = query.shape

    def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [R, H, L, d] -> [S, H, index width, d]
        by_position = x.transpose(1, 2).reshape(n_rows * width, x.shape[1], dim)  # a view of HF's [R, L, H, d]
        return by_position.index_select(0, index.reshape(-1)).view(*index.shape, x.shape[1], dim).transpose(1, 2)

    q = gather(query, layout.query_source)  # [S, Hq, Qmax, d]
    k, v = gather(key, layout.key_index), gather(value, layout.key_index)  # [S, Hkv, Kmax, d]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=layout.bias(q.dtype), dropout_p=dropout, scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1])  # [S, Hq, Qmax, d]
    # Each position's output from its segment's row (padding queries' outputs are never read).
    by_position = out.transpose(1, 2).reshape(-1, n_heads, dim).index_select(0, layout.position_source)
    return by_position.view(n_rows, width, n_heads, dim), None


def register() -> str:
    """Make `NAME` an attention implementation HF models can be loaded with; returns it."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    return NAME
