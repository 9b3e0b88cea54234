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
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    allowed: torch.Tensor

    def to(self, device: torch.device) -> PackedAttention:
        return PackedAttention(self.query_index.to(device), self.key_index.to(device), self.allowed.to(device))


def packed_segments(groups: list[tuple[int, int, list[tuple[int, int]]]], length: int) -> PackedAttention:
    """The segments of a packed row of `length` positions (flat index R * L + column; one row here).
    `groups`: (prompt start, prompt length, [(response start, response length)]) per prompt."""
    queries, keys = [], []
    for start, n_prompt, responses in groups:
        prompt = list(range(start, start + n_prompt))
        queries.append(prompt)
        keys.append(prompt)
        for at, n in responses:
            own = list(range(at, at + n))
            queries.append(own)
            keys.append(prompt + own)
    q_max, k_max = max(1, max(map(len, queries), default=1)), max(1, max(map(len, keys), default=1))
    query_index = torch.full((len(queries), q_max), length, dtype=torch.long)  # padding: the dummy position
    key_index = torch.zeros((len(queries), k_max), dtype=torch.long)
    allowed = torch.zeros((len(queries), q_max, k_max), dtype=torch.bool)
    for s, (q, k) in enumerate(zip(queries, keys)):
        query_index[s, : len(q)] = torch.tensor(q, dtype=torch.long)
        key_index[s, : len(k)] = torch.tensor(k, dtype=torch.long)
        offset = len(k) - len(q)  # query i is key offset + i: it sees keys 0 .. offset + i
        allowed[s, : len(q), : len(k)] = torch.ones(len(q), len(k), dtype=torch.bool).tril(offset)
        allowed[s, len(q):, 0] = True  # padding queries: one key, so no row is all masked (NaN)
    return PackedAttention(query_index, key_index, allowed.unsqueeze(1))


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
    flat = n_rows * width

    def positions(x: torch.Tensor) -> torch.Tensor:  # [R, H, L, d] -> [R * L + 1, H, d], the dummy last
        x = x.transpose(1, 2).reshape(flat, x.shape[1], dim)
        return torch.cat([x, x.new_zeros(1, *x.shape[1:])])

    q = positions(query)[layout.query_index].transpose(1, 2)  # [S, Hq, Qmax, d]
    k, v = (positions(x)[layout.key_index].transpose(1, 2) for x in (key, value))  # [S, Hkv, Kmax, d]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=layout.allowed, dropout_p=dropout, scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1])  # [S, Hq, Qmax, d]
    by_position = out.new_zeros(flat + 1, n_heads, dim).index_copy(
        0, layout.query_index.reshape(-1), out.transpose(1, 2).reshape(-1, n_heads, dim))
    return by_position[:flat].view(n_rows, width, n_heads, dim), None


def register() -> str:
    """Make `NAME` an attention implementation HF models can be loaded with; returns it."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    return NAME
