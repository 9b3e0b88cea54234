"""The chunked LM head (saferl.trainer.logprobs) and the packed layout (batching.pack_batch) against hand values
and against the unchunked, unpacked computation they replace: values and gradients within float32 rounding."""

import math

import pytest
import torch

from saferl.trainer import logprobs
from saferl.trainer.batching import MicroBatch, pack_batch, pad_batch
from saferl.trainer.gspo import policy_loss, sampler_scores, token_entropy, token_logprobs
from saferl.trainer.logprobs import ChunkedHeadScores, head_scores
from saferl.types import TrainBatch

# Probabilities 0.15, 0.5, 0.05, 0.3 (as in test_gspo): with hidden [[1.0]] and weight log p, the logits are log p.
_PROBS = [0.15, 0.5, 0.05, 0.3]
_H = 1.1421247  # -(0.15 ln 0.15 + 0.5 ln 0.5 + 0.05 ln 0.05 + 0.3 ln 0.3)


def _hand_case(requires_grad: bool = True) -> tuple[torch.Tensor, torch.nn.Linear]:
    head = torch.nn.Linear(1, 4, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(_PROBS).log().view(4, 1))
    return torch.ones(1, 1, requires_grad=requires_grad), head


def test_hand_values_and_gradients_of_the_log_prob():
    """lp(target 1) = ln 0.5; d lp / d z = onehot - p; d lp / d h = sum_v (onehot - p)_v ln p_v = ln 0.5 + H."""
    hidden, head = _hand_case()
    lp, ent = head_scores(hidden, head, torch.tensor([1]))
    torch.testing.assert_close(lp, torch.tensor([math.log(0.5)]))
    torch.testing.assert_close(ent, torch.tensor([_H]))
    lp.sum().backward()
    torch.testing.assert_close(head.weight.grad.view(4), torch.tensor([-0.15, 0.5, -0.05, -0.3]))
    torch.testing.assert_close(hidden.grad, torch.tensor([[math.log(0.5) + _H]]))  # 0.4489775


def test_hand_values_and_gradients_of_the_entropy():
    """d H / d z_v = -p_v (ln p_v + H): for v = 1, -0.5 (ln 0.5 + 1.1421247) = -0.2244888."""
    hidden, head = _hand_case()
    _, ent = head_scores(hidden, head, torch.tensor([1]))
    ent.sum().backward()
    expected = [-p * (math.log(p) + _H) for p in _PROBS]  # -0.0131, -0.2245, +0.0930, +0.1455
    torch.testing.assert_close(head.weight.grad.view(4), torch.tensor(expected))
    assert expected[1] == pytest.approx(-0.2244888, abs=1e-6)
    # d H / d h = sum_v dH/dz_v ln p_v (the weight is ln p)
    torch.testing.assert_close(hidden.grad, torch.tensor([[sum(g * math.log(p) for g, p in zip(expected, _PROBS))]]))


def test_hand_values_under_temperature_and_top_p():
    hidden, head = _hand_case(requires_grad=False)
    # T = 0.5 squares the probabilities: 0.0225, 0.25, 0.0025, 0.09 (sum 0.365): lp(1) = ln(0.25 / 0.365).
    lp, _ = head_scores(hidden, head, torch.tensor([1]), temperature=0.5)
    torch.testing.assert_close(lp, torch.tensor([math.log(0.25 / 0.365)]))
    # top_p 0.75: nucleus {1: 0.5, 3: 0.3} -> ln(0.5 / 0.8) = -0.4700036, entropy 0.6615632; target 2 lies
    # outside it and stays in its own support {1, 3, 2}: ln(0.05 / 0.85) = -2.8332133 (entropy still 0.6615632).
    lp, ent = head_scores(hidden.expand(2, 1), head, torch.tensor([1, 2]), top_p=0.75)
    torch.testing.assert_close(lp, torch.tensor([-0.4700036, -2.8332133]))
    torch.testing.assert_close(ent, torch.tensor([0.6615632, 0.6615632]))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (1.3, 0.6)])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_equals_unchunked_values_and_gradients(monkeypatch, temperature, top_p, with_entropy):
    """Random head and hidden states, several chunks (one shorter): log-probs, entropy and the gradients of a
    random combination of them (hidden, weight, bias) equal `sampler_scores` on the full logits."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 4 * 37)  # 4 positions per chunk: chunks of 4, 4, 3
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 6, generator=gen, requires_grad=True)
    head = torch.nn.Linear(6, 37)
    with torch.no_grad():
        head.weight.copy_(torch.randn(37, 6, generator=gen) * 2)
        head.bias.copy_(torch.randn(37, generator=gen) * 0.1)  # seeded too: the case is the same in every run
    targets = torch.randint(0, 37, (11,), generator=gen)
    w_lp, w_ent = torch.randn(11, generator=gen), torch.randn(11, generator=gen)

    def grads(lp, ent):
        loss = (lp * w_lp).sum() + ((ent * w_ent).sum() if with_entropy else 0.0)
        return lp.detach(), ent.detach(), torch.autograd.grad(loss, [hidden, head.weight, head.bias])

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        # float32 rounding of the larger entries (|grad| ~ 20 here) reaches ~1e-5 in a near-cancelling one: the
        # absolute tolerance scales with the tensor's largest entry (with the unseeded bias, ~15% of draws
        # failed a fixed 1e-6 on the hidden-state gradient, by 4-6e-6 against entries of 23, old code and new).
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(b.abs().max())))

    got = grads(*head_scores(hidden, head, targets, temperature, top_p))
    want = grads(*sampler_scores(head(hidden), targets, temperature, top_p))
    for a, b in zip([*got[:2], *got[2]], [*want[:2], *want[2]]):
        close(a, b)
    # The module path (any head: LoRA-wrapped, ZeRO-3-partitioned) gives the same.
    via_module = grads(*head_scores(hidden, head, targets, temperature, top_p, fused=False))
    for a, b in zip([*via_module[:2], *via_module[2]], [*want[:2], *want[2]]):
        close(a, b)


def test_no_positions_and_no_gradient_paths():
    """An empty micro-batch (only a dummy row) scores nothing but stays connected; a frozen head gets no
    gradient computed."""
    head = torch.nn.Linear(3, 5, bias=False)
    hidden = torch.zeros(0, 3, requires_grad=True)
    lp, ent = head_scores(hidden, head, torch.zeros(0, dtype=torch.long))
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == (0, 3) and (head.weight.grad == 0).all()
    head.weight.grad = None
    head.weight.requires_grad_(False)
    hidden = torch.randn(2, 3, requires_grad=True)
    lp, _ = ChunkedHeadScores.apply(hidden, head.weight, None, torch.tensor([0, 4]), 1.0, 1.0, torch.float32)
    lp.sum().backward()
    assert hidden.grad is not None and head.weight.grad is None


def _groups() -> TrainBatch:
    # rows 0, 2, 3 share prompt [11, 12]; row 1 has prompt [13]
    return TrainBatch(input_ids=[[11, 12, 21, 22], [13, 31, 32, 33], [11, 12, 41], [11, 12, 51, 52, 53]],
                      prompt_lens=[2, 1, 2, 2], old_logprobs=[[0.0] * 2, [0.0] * 3, [0.0], [0.0] * 3],
                      advantages=[1.0, -1.0, 0.5, 0.0])


def test_pack_batch_layout_by_hand():
    packed = pack_batch(_groups(), [0, 1, 2, 3], pad_id=0, empty=[False, False, False, True])
    # One row: prompt [11, 12], the responses of rows 0, 2, 3; then prompt [13] and row 1's response.
    assert packed.input_ids.tolist() == [[11, 12, 21, 22, 41, 51, 52, 53, 13, 31, 32, 33]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 2, 3, 4, 0, 1, 2, 3]]
    # Scored: row 0 from the prompt's end (1) and 21 (2); row 1 from 13 (8), 31, 32; row 2 from the prompt's
    # end; row 3 is a dummy (empty): not scored.
    assert packed.scored.tolist() == [1, 2, 8, 9, 10, 1]
    assert packed.targets.tolist() == [21, 22, 31, 32, 33, 41]
    assert packed.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]]
    # Segments: prompt [11, 12]; responses of rows 0, 2, 3 with that prompt's keys first; prompt [13]; row 1's.
    # Padding queries point at the dummy position 12 and see key 0 only.
    att = packed.attention
    assert att.query_index.tolist() == [[0, 1, 12], [2, 3, 12], [4, 12, 12], [5, 6, 7], [8, 12, 12], [9, 10, 11]]
    assert att.key_index.tolist() == [[0, 1, 0, 0, 0], [0, 1, 2, 3, 0], [0, 1, 4, 0, 0], [0, 1, 5, 6, 7],
                                      [8, 0, 0, 0, 0], [8, 9, 10, 11, 0]]
    allowed = att.allowed[:, 0].int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]  # causal prompt, then padding
    assert allowed[1] == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]  # prompt + own response so far


def test_packed_attention_equals_each_sequence_alone():
    """The segment attention of a packed row = SDPA of each (prompt + response) sequence alone, causal, in values
    and in the gradients of q, k, v (GQA: 4 query heads over 2 key heads)."""
    from saferl.trainer.packed_attention import packed_attention_forward

    batch = _groups()
    packed = pack_batch(batch, [0, 1, 2, 3], pad_id=0)
    gen = torch.Generator().manual_seed(2)
    length = packed.input_ids.shape[1]
    q = torch.randn(1, 4, length, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, length, 8, generator=gen, requires_grad=True) for _ in range(2))
    out, _ = packed_attention_forward(None, q, k, v, packed.attention, scaling=0.3)  # [1, L, 4, 8]
    weights = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad((out * weights).sum(), [q, k, v])
    # Each sequence's columns in the packed row (its prompt's, then its response's) and its prompt length; a
    # prompt's outputs are checked with the first sequence that has it, so every position counts once.
    sequences = [([0, 1, 2, 3], 2, True), ([8, 9, 10, 11], 1, True), ([0, 1, 4], 2, False),
                 ([0, 1, 5, 6, 7], 2, False)]
    loss = 0.0
    for cols, n_prompt, with_prompt in sequences:
        idx = torch.tensor(cols)
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, idx], k[:, :, idx].repeat_interleave(2, 1), v[:, :, idx].repeat_interleave(2, 1),
            is_causal=True, scale=0.3).transpose(1, 2)  # [1, n, 4, 8]
        keep = slice(0 if with_prompt else n_prompt, None)
        torch.testing.assert_close(out[:, idx[keep]], alone[:, keep])
        loss = loss + (alone[:, keep] * weights[:, idx[keep]]).sum()
    want = torch.autograd.grad(loss, [q, k, v])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_packed_forward_and_chunked_head_equal_the_padded_unchunked_step(tiny_policy, monkeypatch):
    """The trainer's forward (packed prompts, chunked LM head) against what it replaced (pad_batch, full logits,
    token_logprobs / token_entropy): log-probs, entropy, and the gradients of the GSPO loss with an entropy
    term, on groups that share prompts, with responses of several lengths."""
    from transformers import AutoModelForCausalLM

    from saferl.trainer.policy import PolicyTrainer

    model_dir, vocab = tiny_policy
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 7 * vocab)  # several chunks
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 3, 7)]
    ids, lens = [], []
    for k in range(9):
        response = torch.randint(3, vocab, (1 + (5 * k) % 8,), generator=gen).tolist()
        ids.append(prompts[k % 3] + response)
        lens.append(len(prompts[k % 3]))
    batch = TrainBatch(ids, lens, [[0.0] * (len(i) - n) for i, n in zip(ids, lens)],
                       torch.randn(9, generator=gen).tolist())
    trainer = PolicyTrainer(model_dir, temperature=0.9, top_p=1.0, micro_batch_size=9, minibatches=1)
    model = trainer.policy
    rows = list(range(9))
    adv = torch.tensor(batch.advantages)

    def loss_of(lp, ent, mask):
        return policy_loss(lp, lp.detach() - 0.01, adv, mask, entropy=ent, entropy_coef=-0.5)[0]

    lp, mask, ent = trainer._forward(trainer._pack(batch, MicroBatch(rows, [False] * 9)))
    got = torch.autograd.grad(loss_of(lp, ent, mask), list(model.parameters()))

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    padded = pad_batch(batch, rows, trainer.tokenizer.pad_token_id)
    width = padded.response_width
    logits = reference(input_ids=padded.input_ids, attention_mask=padded.attention_mask,
                       position_ids=padded.position_ids, logits_to_keep=width + 1).logits
    response = padded.input_ids[:, -width:]
    ref_lp = token_logprobs(logits, torch.cat([response[:, :1], response], 1), 0.9) * padded.response_mask
    ref_ent = token_entropy(logits[:, :-1], 0.9) * padded.response_mask
    want = torch.autograd.grad(loss_of(ref_lp, ref_ent, padded.response_mask), list(reference.parameters()))

    torch.testing.assert_close(mask, padded.response_mask)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    scale = max(float(g.abs().max()) for g in want)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        assert float((a - b).abs().max()) <= 1e-4 * scale, name


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.6)])
def test_one_chunk_reuses_the_forward_logits_and_a_second_backward_recomputes(monkeypatch, temperature, top_p):
    """When one chunk holds every position the backward takes the forward's logits instead of a second LM-head
    matmul: the values and gradients equal `sampler_scores`' and those of the chunked path. Catches a forward
    that shifted or masked the kept slab in place (the backward's softmax would then be wrong) and a backward
    that consumed it, so that a second backward (retain_graph) differed from the first."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 5, generator=gen, requires_grad=True)
    head = torch.nn.Linear(5, 23)
    targets = torch.randint(0, 23, (9,), generator=gen)
    w_lp, w_ent = torch.randn(9, generator=gen), torch.randn(9, generator=gen)
    params = [hidden, head.weight, head.bias]
    calls = []
    monkeypatch.setattr(logprobs, "_logits", lambda *a: calls.append(1) or _logits(*a))
    lp, ent = head_scores(hidden, head, targets, temperature, top_p)
    loss = (lp * w_lp).sum() + (ent * w_ent).sum()
    first = torch.autograd.grad(loss, params, retain_graph=True)
    assert len(calls) == 1  # the forward's matmul only
    second = torch.autograd.grad(loss, params)
    assert len(calls) == 2  # the slab was used up: the second backward recomputes it
    want_lp, want_ent = sampler_scores(head(hidden), targets, temperature, top_p)
    want = torch.autograd.grad((want_lp * w_lp).sum() + (want_ent * w_ent).sum(), params)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-6)
    for a, b, c in zip(first, second, want):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    # Without gradients nothing is kept (and a chunked call, several chunks, never keeps its slabs).
    with torch.no_grad():
        head_scores(hidden, head, targets, temperature, top_p)
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 4 * 23)
    calls.clear()
    lp, ent = head_scores(hidden, head, targets, temperature, top_p)
    chunked = torch.autograd.grad((lp * w_lp).sum() + (ent * w_ent).sum(), params)
    assert len(calls) == 2 * 3  # 3 chunks, each recomputed in the backward
    for a, c in zip(chunked, first):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


_logits = logprobs._logits


def _segments_by_loop(groups: list[tuple[int, int, list[tuple[int, int]]]], length: int):
    """The layout built segment by segment, as `packed_segments` defines it: the reference of the vectorised
    construction."""
    queries, keys = [], []
    for start, n_prompt, responses in groups:
        prompt = list(range(start, start + n_prompt))
        queries.append(prompt)
        keys.append(prompt)
        for at, n in responses:
            queries.append(list(range(at, at + n)))
            keys.append(prompt + queries[-1])
    q_max, k_max = max(1, max(map(len, queries), default=1)), max(1, max(map(len, keys), default=1))
    query_index = torch.full((len(queries), q_max), length, dtype=torch.long)
    key_index = torch.zeros((len(queries), k_max), dtype=torch.long)
    allowed = torch.zeros((len(queries), q_max, k_max), dtype=torch.bool)
    for s, (q, k) in enumerate(zip(queries, keys)):
        query_index[s, : len(q)] = torch.tensor(q, dtype=torch.long)
        key_index[s, : len(k)] = torch.tensor(k, dtype=torch.long)
        allowed[s, : len(q), : len(k)] = torch.ones(len(q), len(k), dtype=torch.bool).tril(len(k) - len(q))
        allowed[s, len(q):, 0] = True
    return query_index, key_index, allowed.unsqueeze(1)


def test_packed_segments_equal_the_segment_by_segment_construction():
    """Random layouts (empty responses, one-token prompts, no groups at all): the vectorised index and mask
    tensors equal the loop's exactly; `query_source` is query_index with padding read from position 0 and
    `position_source` finds each position's query slot. Catches an off-by-one in the causal offset or in the
    key padding, and a position whose output would be read from another segment's row."""
    from saferl.trainer.packed_attention import packed_segments

    rng = torch.Generator().manual_seed(5)

    def draw(high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=rng))

    for _ in range(200):
        groups, length = [], 0
        for _ in range(draw(4)):
            n_prompt = 1 + draw(6)
            responses, at = [], length + n_prompt
            for _ in range(draw(4)):
                n = [0, 1, 2, 5, 9][draw(5)]
                responses.append((at, n))
                at += n
            groups.append((length, n_prompt, responses))
            length = at
        got = packed_segments(groups, length)
        want = _segments_by_loop(groups, length)
        for a, b in zip((got.query_index, got.key_index, got.allowed), want):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert torch.equal(got.query_source, got.query_index.masked_fill(got.query_index == length, 0))
        assert torch.equal(got.query_index.reshape(-1)[got.position_source], torch.arange(length))
    with pytest.raises(ValueError, match="exactly one segment"):
        packed_segments([(0, 2, [(2, 1)])], 4)  # position 3 belongs to no segment


def test_packed_attention_bias_is_the_boolean_mask_made_once_per_dtype():
    """SDPA gets the additive form of `allowed` (0 where allowed, -inf elsewhere), the mask SDPA would make of
    the boolean one in every call: built once per layout and dtype, so bf16 queries get a bf16 mask."""
    layout = pack_batch(_groups(), [0, 1, 2, 3], pad_id=0).attention
    bias = layout.bias(torch.float32)
    assert bias is layout.bias(torch.float32)
    assert torch.equal(bias, torch.zeros(bias.shape).masked_fill(~layout.allowed, -math.inf))
    assert layout.bias(torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(layout.to(torch.device("cpu")).bias(torch.float32), bias)
