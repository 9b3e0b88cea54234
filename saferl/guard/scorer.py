"""GuardScorer: one Qwen3Guard-Gen-format guard turning (prompt, response) pairs into typed verdicts.

It is called exactly as the real Qwen3Guard-Gen is: messages in (rendered by the guard tokenizer's own chat
template, the mode picked by the last message's role), text out, greedy. Output that does not parse comes
back as a verdict with `parse_ok=False`; the reward rules decide what it counts as, nothing crashes.
Input longer than the guard's context is cut inside the conversation, oldest context first, keeping the judged
text's end (saferl.truncation), and counted; the instruction and format lines around it are never cut.
"""

from __future__ import annotations

import time
from typing import Any

from saferl.engines import Sampling, make_engine
from saferl.guard.templates import moderation_messages, parse_verdict
from saferl.runtime import check_model_dir, configure_process
from saferl.truncation import fit_messages, template_size, token_head_dropper
from saferl.types import GuardVerdict, ModerationItem  # ModerationItem: also importable from here


def moderation_ids(tokenizer: Any, item: ModerationItem, max_tokens: int) -> tuple[list[int], bool]:
    """The guard's prompt ids for one item, at most `max_tokens` of them, and whether the item was cut."""
    messages = moderation_messages(item.messages, item.response)
    ids = _guard_ids(tokenizer, messages)
    if len(ids) <= max_tokens:
        return ids, False
    fitted = fit_messages(messages, max_tokens, lambda m: len(_guard_ids(tokenizer, m)),
                          token_head_dropper(tokenizer))
    return _guard_ids(tokenizer, fitted), True


def _guard_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)


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
        instruction = max(template_size(lambda m: len(_guard_ids(self.tokenizer, m)), response=r)
                          for r in (False, True))
        if instruction > self.max_prompt_tokens:
            raise ValueError(f"guard.max_model_len (--max-model-len) {max_model_len} leaves "
                             f"{self.max_prompt_tokens} prompt tokens after max_new_tokens={max_new_tokens}, "
                             f"fewer than the {instruction} tokens of the guard's own instruction and format "
                             f"lines ({model})")
        self.truncated = 0
        self.compute_intervals: list[tuple[float, float]] = []
        self.engine = make_engine(backend, model, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                  gpu_memory_utilization=gpu_memory_utilization, kv_cache_mib=kv_cache_mib,
                                  stop_token_ids=[self.tokenizer.eos_token_id],
                                  pad_token_id=self.tokenizer.pad_token_id)

    def _render(self, item: ModerationItem) -> list[int]:
        """The guard's prompt ids for one item, cut to fit the context (and counted) when too long."""
        ids, cut = moderation_ids(self.tokenizer, item, self.max_prompt_tokens)
        self.truncated += cut
        return ids

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
