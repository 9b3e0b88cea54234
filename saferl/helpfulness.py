"""HelpfulnessScorer: a sequence-classification reward model scoring (prompt, answer) pairs.

Any one-label `AutoModelForSequenceClassification` checkpoint works (the toy RM, or a WorldPM-style RM on GPU
nodes). The pair is rendered with the RM tokenizer's chat template as a user turn and an assistant turn.
"""

from __future__ import annotations

from typing import Any

from saferl.runtime import check_model_dir, configure_process


def render_pair(tokenizer: Any, messages: list[dict[str, str]], answer: str) -> str:
    """The RM's input text: the prompt conversation plus the answer as the final assistant turn."""
    return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)


class HelpfulnessScorer:
    """Hosts one helpfulness reward model (HF transformers)."""

    def __init__(self, model: str, *, dtype: str = "float32", batch_size: int = 64, max_length: int = 1024) -> None:
        configure_process()
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_model_dir(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForSequenceClassification.from_pretrained(model, dtype=getattr(torch, dtype))
        self.model.eval()
        if torch.cuda.is_available():
            self.model.cuda()
        self.batch_size = batch_size
        self.max_length = max_length
        self.compute_seconds: list[float] = []

    def score(self, pairs: list[tuple[list[dict[str, str]], str]]) -> list[float]:
        """One scalar per (prompt messages, answer text)."""
        import time

        import torch

        start = time.monotonic()
        texts = [render_pair(self.tokenizer, msgs, answer) for msgs, answer in pairs]
        scores: list[float] = []
        with torch.no_grad():
            for first in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[first : first + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_length, add_special_tokens=False,
                                     padding_side="right")  # as in training: positions start at 0
                enc = {k: v.to(self.model.device) for k, v in enc.items()}
                scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        self.compute_seconds.append(time.monotonic() - start)
        return scores

    def stats(self) -> dict[str, int]:
        return {}  # nothing can fail softly here; the remote client has counters

    def pop_compute(self) -> list[float]:
        out, self.compute_seconds = self.compute_seconds, []
        return out

    def ready(self) -> bool:
        return True
