"""Qwen3Guard-Stream moderation: per-token verdicts fed incrementally on a KV cache, many streams at once.

Owns where the heads are read (spec/qwen3guard.md §3.5, §3.7): the query heads at the `<|im_end|>` closing
the last user turn, the response heads at every later token (the turn markers and the search for them are
`saferl.guard.conversation`'s); `StreamBatch`, which prefills several conversations together (left
padding, explicit per-row positions) and then feeds one token or a chunk per stream per batched forward; and
`moderate_full`, the same readings from one forward over a whole sequence (what the official eval computes).

Shortcuts and choices:
- The user turn is fixed by the prefill prefix: its last `<|im_start|>user`; if the prefix ends inside that
  turn, the first `<|im_end|>` fed later closes it. A new user turn arriving later is not looked for.
- The shipped remote code re-feeds the whole sequence per token; this prefills once and extends the cache,
  which gives the same logits (tests check 1e-4 in float32) at a per-token cost that grows with the prefix
  only through attention itself (benchmarks/stream_guard.py).
- Chunks of different lengths in one step are right-padded; the pad columns stay in the cache, masked out,
  with positions continuing per row, so later tokens never see them. Dropping streams compacts the cache
  (its rows, then the columns no remaining stream uses).
- Streams join a running batch (`add`: their prefixes prefilled together, then merged in) and roll back
  (`rollback`: their newest columns masked out, positions rewound), which a server needs. Both leave holes
  (columns a row does not use); when the cache must grow and at least half of it is holes, every row's real
  columns are packed to the right (`_pack`), so the cache is at most about twice the longest stream wide.
  Keys carry their rotary position, not their column, so moving columns changes no reading.
- `moderate_many` batches whole conversations (right padding, no mask: attention is causal) for evaluation;
  `saferl.guard.stream_eval.StreamLabeler` turns its readings into the labels `saferl guard eval` scores.
- Debouncing and metrics are not here (`saferl.guard.decisions`); `risk_prob` is not rounded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import StaticCache

from saferl.guard.conversation import RoleTokens, find_user_turn
from saferl.guard.stream_model import GuardLogits, Qwen3StreamGuard
from saferl.types import StreamVerdict

CACHE_BLOCK = 64  # cache columns are allocated in blocks of this many
GATHER_FRACTION = 0.25  # a feed carrying at most this share of the open streams forwards only their rows


@dataclass
class StreamStep:
    """What one stream got from one call: the positions fed, their head logits and the verdicts read there.

    `logits` fields are [n, C] for the n tokens fed (no batch axis; `past_key_values` is None). `verdicts`
    holds the query verdict if the user turn's `<|im_end|>` was among them, then one response verdict per
    token after it.
    """

    positions: list[int]
    logits: GuardLogits
    verdicts: list[StreamVerdict]


_Winners = list[tuple[list[list[int]], list[list[float]]]]


def _winners(out: GuardLogits) -> _Winners:
    """Per head (risk, category, query risk, query category): winning class and its probability, [B][T] lists.

    One softmax per head over the whole batch, so a step costs four small ops whatever its batch size.
    """
    winners = []
    for logits in (out.risk_level, out.category, out.query_risk_level, out.query_category):
        prob, index = logits.float().softmax(-1).max(-1)
        winners.append((index.tolist(), prob.tolist()))
    return winners


def _rows(out: GuardLogits) -> list[GuardLogits]:
    """The forward's logits row by row ([T, C] views; one `unbind` per head, not four slices per row)."""
    heads = (out.risk_level, out.category, out.query_risk_level, out.query_category)
    return [GuardLogits(*row) for row in zip(*(h.unbind(0) for h in heads))]


def _step(
    model: Qwen3StreamGuard,
    row_logits: GuardLogits,
    winners: _Winners,
    row: int,
    start: int,
    positions: list[int],
    user_end: int | None,
) -> StreamStep:
    """One stream's `StreamStep` from batch row `row` (its logits `row_logits`, from `_rows`), columns
    `start..` of a forward: the query verdict at `user_end`, a response verdict at every later position."""
    stop = start + len(positions)
    logits = row_logits
    if (start, stop) != (0, row_logits.risk_level.shape[0]):
        logits = GuardLogits(row_logits.risk_level[start:stop], row_logits.category[start:stop],
                             row_logits.query_risk_level[start:stop], row_logits.query_category[start:stop])
    (risk, risk_p), (cat, cat_p), (qrisk, qrisk_p), (qcat, qcat_p) = winners
    verdicts = []
    for col, pos in enumerate(positions, start):
        if user_end is None or pos < user_end:
            continue
        if pos == user_end:  # the query heads, read where the user turn closes
            role, r, r_p, c, c_p = "user", qrisk, qrisk_p, qcat, qcat_p
            risk_map, cat_map = model.query_risk_level_map, model.query_category_map
        else:
            role, r, r_p, c, c_p = "assistant", risk, risk_p, cat, cat_p
            risk_map, cat_map = model.response_risk_level_map, model.response_category_map
        verdicts.append(StreamVerdict(pos, role, risk_map[r[row][col]], r_p[row][col], cat_map[c[row][col]],
                                      c_p[row][col]))
    return StreamStep(positions, logits, verdicts)


@torch.inference_mode()
def moderate_many(
    model: Qwen3StreamGuard,
    sequences: Sequence[Sequence[int]],
    roles: RoleTokens,
    batch_size: int = 16,
    pad_id: int = 0,
) -> list[StreamStep]:
    """`moderate_full` for many conversations, `batch_size` per forward (rows of similar length together).

    Rows are right-padded and run without an attention mask: attention is causal, so padding after a row's
    last token never reaches its real positions, and the readings equal `moderate_full`'s.

    Returns:
        One `StreamStep` per sequence, in input order, covering all its positions.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    user_end = []
    for i, ids in enumerate(sequences):
        end = find_user_turn(ids, roles)[1]
        if end is None:
            raise ValueError(f"conversation {i}: the last user turn has no closing <|im_end|>")
        user_end.append(end)
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    steps: list[StreamStep | None] = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(sequences[i])] = torch.as_tensor(list(sequences[i]))
        out = model(ids.to(device))
        winners, logits = _winners(out), _rows(out)
        for r, i in enumerate(rows):
            steps[i] = _step(model, logits[r], winners, r, 0, list(range(len(sequences[i]))), user_end[i])
    return steps  # type: ignore[return-value]


@torch.inference_mode()
def moderate_full(model: Qwen3StreamGuard, token_ids: Sequence[int], roles: RoleTokens) -> StreamStep:
    """All readings for one conversation from a single forward over the whole sequence (the reference).

    Args:
        token_ids: the full templated conversation; its last user turn must be closed.
    """
    _, user_end = find_user_turn(token_ids, roles)
    if user_end is None:
        raise ValueError("the last user turn has no closing <|im_end|>")
    device = next(model.parameters()).device
    out = model(torch.tensor([list(token_ids)], device=device))
    return _step(model, _rows(out)[0], _winners(out), 0, 0, list(range(len(token_ids))), user_end)


class StreamBatch:
    """Several conversations moderated together on one KV cache, token by token or chunk by chunk.

    Usage: `steps = batch.prefill(prefixes)` once (stream ids are 0..N-1), then `batch.feed({id: chunk, ...})`
    as tokens arrive (streams without a chunk this step are skipped), and `batch.drop(ids)` when one ends.

    The cache is a transformers `StaticCache` grown in blocks of `CACHE_BLOCK` columns: writes are in place,
    so a step costs the forward over its new tokens plus attention over the columns so far. `DynamicCache`
    instead re-allocates and copies every layer's whole cache on each step, a cost that grows with length
    (on CPU, for the benchmark's 8-layer model: 2.6 ms per token at 1k tokens on a ~15 ms step, and ~40 ms
    per step for 32 streams of 100 tokens).

    Args:
        model: the Stream guard (its parameters' dtype and device are used).
        roles: turn-marker ids from the guard's tokenizer (`role_tokens`).
        pad_id: id placed in padded slots; never attended to, so any valid id works.
    """

    def __init__(self, model: Qwen3StreamGuard, roles: RoleTokens, pad_id: int = 0):
        self.model, self.roles, self.pad_id = model, roles, pad_id
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache: StaticCache | None = None
        self.prefilled = False
        # [B, W]: True where a cache column holds a real token of that row (not left or chunk padding).
        self.mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.ids: list[int] = []  # stream id of each batch row
        self.next_id = 0  # id the next stream opened gets
        self.lengths: list[int] = []  # real tokens so far per row = next rotary position
        self.user_end: list[int | None] = []  # position of the user turn's <|im_end|> per row, once seen

    @property
    def active(self) -> list[int]:
        """Ids of the streams still open."""
        return list(self.ids)

    @torch.inference_mode()
    def prefill(self, prefixes: Sequence[Sequence[int]]) -> list[StreamStep]:
        """Start one stream per prefix (ids 0..N-1) with one left-padded forward.

        Each prefix must contain its user turn's `<|im_start|>user`; it may end at or after that turn's
        `<|im_end|>`, or before it. Returns one `StreamStep` per stream covering all its prefix tokens.
        """
        if self.prefilled:
            raise RuntimeError("StreamBatch.prefill runs once; open a new StreamBatch for new conversations")
        if not prefixes or any(len(p) == 0 for p in prefixes):
            raise ValueError("prefill needs at least one non-empty prefix")
        user_end = [find_user_turn(p, self.roles)[1] for p in prefixes]
        self.prefilled = True
        width = max(len(p) for p in prefixes)
        ids = torch.full((len(prefixes), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prefixes), width, dtype=torch.bool)
        for r, prefix in enumerate(prefixes):
            ids[r, width - len(prefix) :] = torch.tensor(list(prefix))
            mask[r, width - len(prefix) :] = True
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        self.ids, self.user_end = list(range(len(prefixes))), user_end
        self.next_id = len(prefixes)
        self.lengths = [len(p) for p in prefixes]
        self.mask = torch.zeros(len(prefixes), 0, dtype=torch.bool, device=self.device)
        self.cache = self._new_cache(len(prefixes), width)
        out = self._forward(ids, mask, positions)
        winners, logits = _winners(out), _rows(out)
        return [
            _step(self.model, logits[r], winners, r, width - len(p), list(range(len(p))), user_end[r])
            for r, p in enumerate(prefixes)
        ]

    @torch.inference_mode()
    def feed(self, chunks: Mapping[int, Sequence[int]]) -> dict[int, StreamStep]:
        """Extend each named stream by its chunk (one token or more) in one batched forward.

        When at most `GATHER_FRACTION` of the open streams have a chunk, only their rows are forwarded: their
        cache rows are gathered into a small cache, and the new columns written back (`_forward_rows`), so
        a tick that carries few streams costs about what those streams cost, not a whole-batch forward.
        Either way the readings are the same.

        Returns:
            stream id -> `StreamStep` for the tokens just fed, for every stream with a non-empty chunk.
        """
        unknown = sorted(set(chunks) - set(self.ids))
        if unknown:
            raise KeyError(f"streams {unknown} are not open (open: {self.ids})")
        fed = [r for r, sid in enumerate(self.ids) if chunks.get(sid)]
        if not fed:
            return {}
        n = max(len(chunks[self.ids[r]]) for r in fed)
        rows = fed if len(fed) <= GATHER_FRACTION * len(self.ids) else list(range(len(self.ids)))
        lists = [list(chunks.get(self.ids[r], ())) for r in rows]
        ids = torch.tensor([c + [self.pad_id] * (n - len(c)) for c in lists], dtype=torch.long)
        new = torch.tensor([[True] * len(c) + [False] * (n - len(c)) for c in lists], dtype=torch.bool)
        positions = torch.tensor([self.lengths[r] for r in rows]).unsqueeze(1) + torch.arange(n)
        out = self._forward_rows(rows, ids, new, positions) if len(rows) < len(self.ids) else self._forward(
            ids, new, positions)
        winners, logits = _winners(out), _rows(out)
        steps = {}
        for i, (r, chunk) in enumerate(zip(rows, lists)):
            if not chunk:
                continue
            pos = list(range(self.lengths[r], self.lengths[r] + len(chunk)))
            if self.user_end[r] is None and self.roles.im_end in chunk:
                self.user_end[r] = pos[chunk.index(self.roles.im_end)]
            self.lengths[r] += len(chunk)
            steps[self.ids[r]] = _step(self.model, logits[i], winners, i, 0, pos, self.user_end[r])
        return steps

    def drop(self, stream_ids: Iterable[int]) -> None:
        """Close streams: remove their cache rows, then cache columns no remaining stream attends to."""
        gone = set(stream_ids)
        unknown = sorted(gone - set(self.ids))
        if unknown:
            raise KeyError(f"streams {unknown} are not open (open: {self.ids})")
        keep = [r for r, sid in enumerate(self.ids) if sid not in gone]
        self.ids = [self.ids[r] for r in keep]
        self.lengths = [self.lengths[r] for r in keep]
        self.user_end = [self.user_end[r] for r in keep]
        if not keep:
            self.cache, self.mask = None, self.mask[:0, :0]
            return
        rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.mask = self.mask[rows]
        cols = self.mask.any(0).nonzero().squeeze(1)
        self.mask = self.mask[:, cols]
        self._rebuild(rows, cols, capacity=self.cache.get_max_length())

    @torch.inference_mode()
    def add(self, prefixes: Sequence[Sequence[int]]) -> dict[int, StreamStep]:
        """Open more streams, on a batch that may already be running: the new prefixes are prefilled together
        (one forward, as `prefill`), then merged into the cache. Ids continue after the last one given.

        Returns:
            new stream id -> `StreamStep` covering all its prefix tokens.
        """
        other = StreamBatch(self.model, self.roles, self.pad_id)
        steps = other.prefill(prefixes)
        ids = list(range(self.next_id, self.next_id + len(prefixes)))
        self.next_id += len(prefixes)
        self.prefilled = True
        if not self.ids:
            self.cache, self.mask = other.cache, other.mask
        else:
            self._pack([self, other])
        self.ids += ids
        self.lengths += other.lengths
        self.user_end += other.user_end
        return dict(zip(ids, steps))

    @torch.inference_mode()
    def rollback(self, stream_id: int, n: int) -> None:
        """Forget the newest `n` tokens of a stream: the next token fed takes the position of the first one
        forgotten and reads as if they had never been fed. At least one token must remain."""
        if stream_id not in self.ids:
            raise KeyError(f"stream {stream_id} is not open (open: {self.ids})")
        r = self.ids.index(stream_id)
        if not 0 <= n < self.lengths[r]:
            raise ValueError(f"stream {stream_id} holds {self.lengths[r]} tokens: cannot roll back {n}")
        if n == 0:
            return
        cols = self.mask[r].nonzero().squeeze(1)[-n:]
        self.mask[r, cols] = False
        self.lengths[r] -= n
        if self.user_end[r] is not None and self.user_end[r] >= self.lengths[r]:
            self.user_end[r] = None  # the user turn's <|im_end|> was forgotten: the next one fed closes it

    def _pack(self, parts: Sequence[StreamBatch], capacity: int = 0) -> None:
        """Rebuild the cache from the rows of `parts` in order, each row's real columns packed to the right
        (in their order): the new width is the longest row's token count. `capacity` reserves more columns."""
        width = max(int(part.mask.sum(1).max()) for part in parts)
        new = self._new_cache(sum(len(part.ids) for part in parts), max(width, capacity))
        masks, row = [], 0
        for part in parts:
            real = part.mask
            count = real.sum(1, keepdim=True)
            order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices  # real columns first
            offset = torch.arange(width, device=self.device) - (width - count)  # [b, width]; < 0: padding
            keep = offset >= 0
            src = order.gather(1, offset.clamp(0, real.shape[1] - 1))
            for src_layer, dst in zip(part.cache.layers, new.layers):
                index = src[:, None, :, None].expand(-1, src_layer.keys.shape[1], -1, src_layer.keys.shape[3])
                dst.keys[row : row + len(src), :, :width] = src_layer.keys.gather(2, index)
                dst.values[row : row + len(src), :, :width] = src_layer.values.gather(2, index)
            masks.append(keep)
            row += len(src)
        for layer in new.layers:
            layer.cumulative_length.fill_(width)
        self.cache, self.mask = new, torch.cat(masks)

    def _forward(self, ids: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> GuardLogits:
        """One batched forward of new columns [B, n] (`new` marks the real ones) on top of the cache."""
        self._make_room(ids.shape[1])
        self.mask = torch.cat([self.mask, new.to(self.device)], dim=1)
        return self.model(
            ids.to(self.device),
            attention_mask=self.mask,
            position_ids=positions.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
        )

    def _make_room(self, n: int) -> None:
        """Make the cache hold n more columns: pack it when it is mostly holes, else grow it."""
        used = self.mask.shape[1]
        if used + n > self.cache.get_max_length() and 2 * (int(self.mask.sum(1).max()) + n) <= used:
            self._pack([self], capacity=int(self.mask.sum(1).max()) + n)  # mostly holes: pack, do not grow
        elif used + n > self.cache.get_max_length():
            self._rebuild(
                torch.arange(len(self.ids), device=self.device),
                torch.arange(used, device=self.device),
                capacity=used + n,
            )

    def _forward_rows(self, rows: list[int], ids: torch.Tensor, new: torch.Tensor,
                      positions: torch.Tensor) -> GuardLogits:
        """`_forward` for some rows only ([k, n] new columns for batch rows `rows`): the cache grows by n
        columns for every row (masked out for the others, as a full forward's padding would be), those rows'
        cache is copied into a k-row cache, forwarded, and its n new columns copied back."""
        n, k = ids.shape[1], len(rows)
        self._make_room(n)
        used = self.mask.shape[1]
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        small = self._new_cache(k, self.cache.get_max_length())  # the same capacity: rows copy in one op
        for src, dst in zip(self.cache.layers, small.layers):
            torch.index_select(src.keys, 0, index, out=dst.keys)
            torch.index_select(src.values, 0, index, out=dst.values)
            dst.cumulative_length.fill_(used)
        grown = torch.zeros(len(self.ids), n, dtype=torch.bool, device=self.device)
        grown[index] = new.to(self.device)
        self.mask = torch.cat([self.mask, grown], dim=1)
        out = self.model(ids.to(self.device), attention_mask=self.mask.index_select(0, index),
                         position_ids=positions.to(self.device), past_key_values=small, use_cache=True)
        for src, dst in zip(small.layers, self.cache.layers):
            dst.keys[index, :, used : used + n] = src.keys[:, :, used : used + n]
            dst.values[index, :, used : used + n] = src.values[:, :, used : used + n]
            dst.cumulative_length.fill_(used + n)
        return out

    def _new_cache(self, batch: int, capacity: int) -> StaticCache:
        config = self.model.config
        capacity = -(-max(capacity, 1) // CACHE_BLOCK) * CACHE_BLOCK
        cache = StaticCache(config=config, max_cache_len=capacity)
        heads, head_dim = config.num_key_value_heads, config.head_dim
        cache.early_initialization(batch, heads, head_dim, self.dtype, self.device)
        return cache

    def _rebuild(self, rows: torch.Tensor, cols: torch.Tensor, capacity: int) -> None:
        """Copy cache rows `rows` and columns `cols` (in order) into a new cache of >= `capacity` columns."""
        old, self.cache = self.cache, self._new_cache(len(rows), capacity)
        for src, dst in zip(old.layers, self.cache.layers):
            dst.keys[:, :, : len(cols)] = src.keys.index_select(0, rows).index_select(2, cols)
            dst.values[:, :, : len(cols)] = src.values.index_select(0, rows).index_select(2, cols)
            dst.cumulative_length.fill_(len(cols))
