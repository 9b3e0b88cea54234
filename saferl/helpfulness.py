"""HelpfulnessScorer: a sequence-classification reward model scoring (prompt, answer) pairs.

Any one-label `AutoModelForSequenceClassification` checkpoint works (the toy RM, or a WorldPM-style RM on GPU
nodes), hosted on HF transformers or on vLLM's pooling runner (where vLLM supports the architecture). The pair is
rendered with the RM tokenizer's chat template as a user turn and an assistant turn; the score is the raw logit.
"""

from __future__ import annotations

import time
from typing import Any

from saferl.engines import make_classifier
from saferl.runtime import check_model_dir, configure_process


def render_pair(tokenizer: Any, messages: list[dict[str, str]], answer: str) -> str:
    """The RM's input text: the prompt conversation plus the answer as the final assistant turn."""
    return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)


class HelpfulnessScorer:
    """Hosts one helpfulness reward model (`backend`: hf or vllm)."""

    def __init__(self, model: str, *, backend: str = "hf", dtype: str = "float32", batch_size: int = 64,
                 max_length: int = 1024, gpu_memory_utilization: float = 0.3, kv_cache_mib: int = 64) -> None:
        configure_process()
        from transformers import AutoTokenizer

        check_model_dir(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.max_length = max_length
        self.classifier = make_classifier(backend, model, dtype=dtype, batch_size=batch_size,
                                          max_model_len=max_length, gpu_memory_utilization=gpu_memory_utilization,
                                          kv_cache_mib=kv_cache_mib, pad_token_id=self.tokenizer.pad_token_id)
        self.compute_intervals: list[tuple[float, float]] = []

    def score(self, pairs: list[tuple[list[dict[str, str]], str]]) -> list[float]:
        """One scalar per (prompt messages, answer text); inputs past `max_length` tokens keep their start."""
        start = time.time()
        ids = [self.tokenizer(render_pair(self.tokenizer, msgs, answer), add_special_tokens=False)["input_ids"]
               [: self.max_length] for msgs, answer in pairs]
        scores = self.classifier.classify(ids) if ids else []
        self.compute_intervals.append((start, time.time()))
        return scores

    def stats(self) -> dict[str, int]:
        return {}  # nothing can fail softly here; the remote client has counters

    def pop_compute(self) -> list[tuple[float, float]]:
        """Model compute since the last pop: (start, end) `time.time()` intervals, for `tracking.step_timing`."""
        out, self.compute_intervals = self.compute_intervals, []
        return out

    def ready(self) -> bool:
        return True
