"""GuardScorer: one Qwen3Guard-Gen-format guard turning (prompt, response) pairs into typed verdicts.

It is called exactly as the real Qwen3Guard-Gen is: messages in (rendered by the guard tokenizer's own chat
template, the mode picked by the last message's role), text out, greedy. Output that does not parse comes
back as a verdict with `parse_ok=False`; the reward rules decide what it counts as, nothing crashes.
Input longer than the guard's context has its moderated text cut from the left and is counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from saferl.engines import Sampling, make_engine
from saferl.guard.templates import moderation_messages, parse_verdict
from saferl.runtime import check_model_dir, configure_process
from saferl.types import GuardVerdict


@dataclass(frozen=True)
class ModerationItem:
    """What to judge: the prompt conversation and, for response moderation, the response text."""

    messages: list[dict[str, str]]
    response: str | None = None


class GuardScorer:
    """Hosts one Gen guard model on vLLM (default) or HF."""

    def __init__(self, model: str, *, backend: str = "vllm", max_new_tokens: int = 32, max_model_len: int = 1024,
                 dtype: str = "float32", gpu_memory_utilization: float = 0.3, kv_cache_mib: int = 64,
                 seed: int = 0) -> None:
        configure_process()
        check_model_dir(model)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_model_len - max_new_tokens
        self.truncated = 0
        self.compute_intervals: list[tuple[float, float]] = []
        self.engine = make_engine(backend, model, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                  gpu_memory_utilization=gpu_memory_utilization, kv_cache_mib=kv_cache_mib,
                                  stop_token_ids=[self.tokenizer.eos_token_id],
                                  pad_token_id=self.tokenizer.pad_token_id)

    def _render(self, item: ModerationItem) -> list[int]:
        messages = moderation_messages(item.messages, item.response)
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        if len(ids) <= self.max_prompt_tokens:
            return ids
        # Too long: keep the instruction, cut the oldest part of the judged text, and count it.
        self.truncated += 1
        last = messages[-1]
        toks = self.tokenizer(last["content"], add_special_tokens=False)["input_ids"]
        keep = max(0, len(toks) - (len(ids) - self.max_prompt_tokens))
        last["content"] = self.tokenizer.decode(toks[len(toks) - keep :])
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        return ids[-self.max_prompt_tokens :]

    def moderate(self, items: list[ModerationItem]) -> list[GuardVerdict]:
        """One verdict per item (prompt mode when `response` is None, response mode otherwise)."""
        if not items:
            return []
        prompts = [self._render(it) for it in items]
        start = time.time()
        outs = self.engine.generate(prompts, Sampling(n=1, temperature=0.0, max_tokens=self.max_new_tokens,
                                                      logprobs=False),
                                    seeds=[0] * len(prompts))
        self.compute_intervals.append((start, time.time()))
        texts = [self.tokenizer.decode(o[0].token_ids, skip_special_tokens=True) for o in outs]
        return [parse_verdict(t, "prompt" if it.response is None else "response") for t, it in zip(texts, items)]

    def pop_compute(self) -> list[tuple[float, float]]:
        """Model compute since the last pop: (start, end) `time.time()` intervals, for `tracking.step_timing`."""
        out, self.compute_intervals = self.compute_intervals, []
        return out

    def stats(self) -> dict[str, int]:
        return {"truncated": self.truncated}

    def ready(self) -> bool:
        return True
