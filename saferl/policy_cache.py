"""The policy's side of CARE decoding: many conversations on one KV cache with per-row rollback, and sampling.

`PolicyBatch` feeds each row's unfed tokens in right-padded, masked chunks and can drop a row's last tokens
from the cache (CARE's rollback); `sample_tokens` draws one token per row with that row's generator. Written
by hand because HF `generate` has no per-row rollback; `saferl.care` drives both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch



class PolicyBatch:
    """Many conversations decoded together on one `DynamicCache`, with per-row rollback.

    Row r's context is `context[r]` (token ids); `fed[r]` of them are in the cache, at columns `cols[r]`.
    `step` feeds every named row's unfed tokens (right-padded chunks, masked) and returns next-token logits.

    Args:
        model: an HF causal LM whose logits are `get_output_embeddings()(last hidden state)` (Qwen3, Llama).
        contexts: the prompt ids of each row (rows are 0..N-1).
        pad_id: id placed in padded slots (never attended to).
    """

    def __init__(self, model: Any, contexts: Sequence[Sequence[int]], pad_id: int = 0):
        import torch
        from transformers import DynamicCache

        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.context = [list(c) for c in contexts]
        self.fed = [0] * len(contexts)
        self.cols: list[list[int]] = [[] for _ in contexts]
        self.rows = list(range(len(contexts)))  # row id of each batch position
        self.mask = torch.zeros(len(contexts), 0, dtype=torch.long, device=self.device)  # [B, W]
        self.cache = DynamicCache()

    def append(self, row: int, tokens: Sequence[int]) -> None:
        self.context[row] += list(tokens)

    def truncate(self, row: int, length: int) -> None:
        """Keep `context[row][:length]` (length >= 1); its last token is fed again for the next logits."""
        self.context[row] = self.context[row][:length]
        keep = min(self.fed[row], length - 1)
        at = self.rows.index(row)
        self.mask[at, self.cols[row][keep:]] = 0
        self.cols[row], self.fed[row] = self.cols[row][:keep], keep

    def step(self, rows: Sequence[int]) -> torch.Tensor:
        """One forward over the unfed tokens of `rows`. Returns next-token logits [len(rows), V] (float32)."""
        import torch

        chunks = {r: self.context[r][self.fed[r]:] for r in rows}
        if any(not c for c in chunks.values()):
            raise ValueError("a row has no new token to feed")
        n = max(len(c) for c in chunks.values())
        width = self.mask.shape[1]
        ids = torch.full((len(self.rows), n), self.pad_id, dtype=torch.long)
        new = torch.zeros(len(self.rows), n, dtype=torch.long)
        positions = torch.zeros(len(self.rows), n, dtype=torch.long)
        last = []
        for b, r in enumerate(self.rows):
            positions[b] = self.fed[r] + torch.arange(n)
            if r in chunks:
                ids[b, : len(chunks[r])] = torch.tensor(chunks[r])
                new[b, : len(chunks[r])] = 1
                last.append((b, len(chunks[r]) - 1))
                self.cols[r] += range(width, width + len(chunks[r]))
                self.fed[r] = len(self.context[r])
        self.mask = torch.cat([self.mask, new.to(self.device)], dim=1)
        out = self.model.get_decoder()(input_ids=ids.to(self.device), attention_mask=self.mask,
                                       position_ids=positions.to(self.device), past_key_values=self.cache,
                                       use_cache=True)
        index = torch.tensor(last, device=self.device)
        hidden = out.last_hidden_state[index[:, 0], index[:, 1]]  # [len(rows), H]
        return self.model.get_output_embeddings()(hidden).float()

    def drop(self, rows: Sequence[int]) -> None:
        """Forget finished rows: their cache rows, then the columns no remaining row attends to."""
        import torch

        gone = set(rows)
        keep = [b for b, r in enumerate(self.rows) if r not in gone]
        self.rows = [self.rows[b] for b in keep]
        if not self.rows or self.mask.shape[1] == 0:
            self.mask = self.mask[keep]
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self.mask = self.mask[keep]
        used = self.mask.bool().any(0).nonzero().squeeze(1)
        remap = torch.full((self.mask.shape[1],), -1, dtype=torch.long)
        remap[used.cpu()] = torch.arange(len(used))
        self.mask = self.mask[:, used]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, used], layer.values[:, :, used]
        for r in self.rows:
            self.cols[r] = remap[self.cols[r]].tolist() if self.cols[r] else []


def sample_tokens(logits: torch.Tensor, temperatures: Sequence[float], top_p: float,
                  generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row of `logits` [N, V]: argmax where the temperature is 0, else a nucleus sample drawn
    with that row's generator."""
    import torch

    out = []
    for row, temp, gen in zip(logits, temperatures, generators):
        if temp == 0:
            out.append(int(row.argmax()))
            continue
        probs = torch.softmax(row / temp, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(0, order[drop], 0.0)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out
