"""HelpfulnessScorer: a sequence-classification reward model scoring (prompt, answer) pairs.

Any one-label `AutoModelForSequenceClassification` checkpoint works (the toy RM, or a WorldPM-style RM on GPU
nodes), hosted on HF transformers or on vLLM's pooling runner (where vLLM supports the architecture). The pair is
rendered with the RM tokenizer's chat template as a user turn and an assistant turn; the score is the raw logit.
A pair over `max_length` tokens is cut from its oldest context and keeps the answer's end and the template's
closing tokens, where the score is pooled (saferl.truncation); each cut pair is counted in `stats()`.

An RM ensemble (helpfulness.ensemble) is hosted in the same actor: one classifier (and tokenizer) per member,
each pair scored by every member; the reward rules aggregate the members' scores (rewards.base).
"""

from __future__ import annotations

import time
from typing import Any

from saferl.engines import make_classifier
from saferl.runtime import check_model_dir, configure_process
from saferl.truncation import fit_messages, template_size, token_head_dropper


def render_pair(tokenizer: Any, messages: list[dict[str, str]], answer: str) -> str:
    """The RM's input text: the prompt conversation plus the answer as the final assistant turn."""
    return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)


def pair_ids(tokenizer: Any, messages: list[dict[str, str]], answer: str,
             max_length: int) -> tuple[list[int], bool]:
    """The RM's input ids for one pair, at most `max_length` of them, and whether the pair had to be cut."""
    ids = _chat_ids(tokenizer, messages + [{"role": "assistant", "content": answer}])
    if len(ids) <= max_length:
        return ids, False
    fitted = fit_messages(messages + [{"role": "assistant", "content": answer}], max_length,
                          lambda m: len(_chat_ids(tokenizer, m)), token_head_dropper(tokenizer))
    return _chat_ids(tokenizer, fitted), True


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    # Tokenised from the rendered text, as the toy RM was trained (toyworld/build.py).
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class HelpfulnessScorer:
    """Hosts one helpfulness reward model (`backend`: hf or vllm), and the further `members` of an ensemble."""

    def __init__(self, model: str, *, members: tuple[str, ...] = (), backend: str = "hf", dtype: str = "float32",
                 batch_size: int = 64, max_length: int = 1024, gpu_memory_utilization: float = 0.3,
                 kv_cache_mib: int = 64) -> None:
        configure_process()
        from transformers import AutoTokenizer

        self.max_length = max_length
        self.tokenizers, self.classifiers = [], []
        for path in (model, *members):
            check_model_dir(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            overhead = template_size(lambda m, t=tokenizer: len(_chat_ids(t, m)), response=True)
            if overhead > max_length:
                raise ValueError(f"helpfulness.max_length (--max-model-len) {max_length} is shorter than the "
                                 f"{overhead} tokens of the RM's chat template around an empty prompt and "
                                 f"answer ({path})")
            self.tokenizers.append(tokenizer)
            self.classifiers.append(make_classifier(
                backend, path, dtype=dtype, batch_size=batch_size, max_model_len=max_length,
                gpu_memory_utilization=gpu_memory_utilization, kv_cache_mib=kv_cache_mib,
                pad_token_id=tokenizer.pad_token_id))
        self.truncated = 0
        self.compute_intervals: list[tuple[float, float]] = []

    def score(self, pairs: list[tuple[list[dict[str, str]], str]]) -> list[float]:
        """`model`'s score per (prompt messages, answer text); pairs over `max_length` tokens are cut, counted."""
        start = time.time()
        scores = self._member_scores(0, pairs)
        self.compute_intervals.append((start, time.time()))
        return scores

    def score_with_fallbacks(self, pairs: list[tuple[list[dict[str, str]], str]]
                             ) -> list[tuple[tuple[float, ...], bool]]:
        """(every member's score, `model`'s first; False) per pair: a hosted model never stands in
        (RemoteHelpfulnessScorer can)."""
        start = time.time()
        per_member = [self._member_scores(k, pairs) for k in range(len(self.classifiers))]
        self.compute_intervals.append((start, time.time()))
        return [(scores, False) for scores in zip(*per_member, strict=True)]

    def _member_scores(self, k: int, pairs: list[tuple[list[dict[str, str]], str]]) -> list[float]:
        # Each member renders with its own tokenizer; every member's cut pair is counted.
        fitted = [pair_ids(self.tokenizers[k], msgs, answer, self.max_length) for msgs, answer in pairs]
        self.truncated += sum(cut for _, cut in fitted)
        ids = [i for i, _ in fitted]
        return self.classifiers[k].classify(ids) if ids else []

    def stats(self) -> dict[str, int]:
        return {"truncated": self.truncated}

    def pop_compute(self) -> list[tuple[float, float]]:
        """Model compute since the last pop: (start, end) `time.time()` intervals, for `tracking.step_timing`."""
        out, self.compute_intervals = self.compute_intervals, []
        return out

    def ready(self) -> bool:
        return True
