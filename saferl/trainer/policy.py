"""PolicyTrainer: one data-parallel rank of the policy update (model, optimizer, GSPO/GRPO step, state).

One `train_step` per rollout batch. Every rank receives the whole batch and the same seeded permutation cuts
it into `minibatches` optimizer steps, this rank's share of each, and micro-batches (`batching.assign`).
pi_old is the policy before the step: for the first minibatch it is the live forward itself (so the ratio is
exactly 1 there), for the later, off-policy ones it is recomputed without gradient before the first update.
That is where GSPO's sequence-ratio clip acts. pi is the engine's sampling distribution (temperature and top-p
nucleus, see gspo.py). The rollout engine's own log-probs are only compared with pi_old, as a health metric.

Lifecycle: `PolicyTrainer(...)` loads the model on every rank; with several ranks, `address()` on rank 0
names a rendezvous and `connect(address)` on all joins the process group and builds the engine (plain
torch/DDP or DeepSpeed ZeRO); `saferl.handles.TrainerGroup.connect` does both. A single rank connects
itself.
A plain class: Ray hosts the ranks as actors, `executor: local` runs one rank in-process.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from saferl.engines import WeightBucket, pack_bucket, state_dict_blob
from saferl.runtime import check_model_dir, configure_process
from saferl.trainer import batching, distributed, lora, packed_attention
from saferl.trainer.gspo import policy_loss, warn_if_misconfigured
from saferl.trainer.logprobs import head_scores
from saferl.trainer.unlikelihood import (count_implausible, implausible_mask, implausible_mass_loss,
                                         unlikelihood_loss)
from saferl.types import TrainBatch

LR_SCHEDULES = ("constant", "cosine")


def lr_at(step: int, base_lr: float, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for training step `step` (1-based): linear warm-up, then constant or cosine to zero."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if warmup_steps and step <= warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    # Cosine: the first step after warm-up runs at base_lr; the rate would reach 0 one step past the end.
    span = max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps - 1) / span)))


class PolicyTrainer:
    """The policy being trained (HF causal LM, optionally with LoRA), its optimizer and the GSPO/GRPO update."""

    def __init__(self, model: str, *, rank: int = 0, world_size: int = 1, strategy: str = "torch",
                 zero_stage: int = 2, lr: float = 1e-4, lr_schedule: str = "constant", warmup_steps: int = 0,
                 total_steps: int = 1, weight_decay: float = 0.0, max_grad_norm: float = 1.0, minibatches: int = 2,
                 micro_batch_size: int = 16, loss: str = "gspo", clip_low: float = 3e-4, clip_high: float = 4e-4,
                 aggregation: str = "seq-mean-token-mean", temperature: float = 1.0, top_p: float = 1.0,
                 dtype: str = "float32", kl_coef: float = 0.0, entropy_coef: float = 0.0, lora_rank: int = 0,
                 lora_alpha: float = 32.0, lora_dropout: float = 0.0, lora_target_modules: tuple[str, ...] = (
                 "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), seed: int = 0,
                 reference_scoring: bool = False, unlikelihood_coef: float = 0.0,
                 implausible_mass_coef: float = 0.0, implausible_logprob: float | None = None) -> None:
        configure_process()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_model_dir(model)
        if (unlikelihood_coef > 0 or implausible_mass_coef > 0) and implausible_logprob is None:
            raise ValueError("unlikelihood_coef or implausible_mass_coef > 0 needs implausible_logprob, the "
                             "reference log-prob below which a token is implausible (trainer."
                             "unlikelihood_coef and trainer.implausible_mass_coef need "
                             "reward.rules.fluency_min_logprob)")
        if strategy not in ("torch", "deepspeed"):
            raise ValueError(f"trainer.strategy must be 'torch' or 'deepspeed', got {strategy!r}")
        if dtype not in ("float32", "bfloat16"):  # float16 would need a loss scaler, which neither engine has
            raise ValueError(f"trainer.dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        self.rank, self.world_size, self.strategy, self.zero_stage = rank, world_size, strategy, zero_stage
        torch.manual_seed(seed)
        random.seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        # Master weights stay fp32; `dtype` is the compute dtype (autocast, or DeepSpeed's bf16 mode).
        # Attention over pack_batch's segments (HF's SDPA for any other mask).
        attention = packed_attention.register()
        policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation=attention)
        if device is not None:
            policy.to(device)
        self.compute_dtype = getattr(torch, dtype)
        if lora_rank:
            policy = lora.apply_lora(policy, lora_rank, lora_alpha, lora_dropout, list(lora_target_modules))
        policy.train()
        self.policy = policy
        # The reference, for the KL term and (`reference_scoring`) the driver's `reference_logprobs`: the base
        # model with the adapter off under LoRA, else a frozen copy of the start.
        self.has_reference = kl_coef > 0 or reference_scoring
        self.reference = None
        if self.has_reference and not lora_rank:
            self.reference = AutoModelForCausalLM.from_pretrained(model, dtype=self.compute_dtype,
                                                                  attn_implementation=attention)
            self.reference.to(policy.device).eval().requires_grad_(False)
        self.kl_coef, self.entropy_coef = kl_coef, entropy_coef
        # The token penalties (trainer/unlikelihood.py) on tokens whose reference log-prob, carried by the
        # batch (TrainBatch.reference_logprobs), is below implausible_logprob.
        self.unlikelihood_coef, self.implausible_mass_coef = unlikelihood_coef, implausible_mass_coef
        self.implausible_logprob = implausible_logprob
        self.lr_args = dict(base_lr=lr, schedule=lr_schedule, warmup_steps=warmup_steps, total_steps=total_steps)
        lr_at(1, **self.lr_args)  # an unknown schedule fails here, at start-up
        self.weight_decay, self.max_grad_norm = weight_decay, max_grad_norm
        self.minibatches, self.micro_batch_size = minibatches, micro_batch_size
        self.loss_kwargs = dict(mode=loss, clip_low=clip_low, clip_high=clip_high, aggregation=aggregation)
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed)  # the same on every rank: one permutation
        self.steps_done = 0
        self.engine: distributed.TrainingEngine | None = None
        self.compute_intervals: list[tuple[float, float]] = []
        self.warning = warn_if_misconfigured(loss, aggregation)
        if self.warning and rank == 0:
            print(f"[saferl] warning: {self.warning}", flush=True)
        if world_size == 1:  # nothing to rendezvous with: ready at once
            self.connect()

    # ---- set-up -------------------------------------------------------------------------------------------

    def address(self) -> tuple[str, int]:
        """A rendezvous address on this rank's node (asked of rank 0)."""
        return distributed.rendezvous_address()

    def connect(self, address: tuple[str, int] | None = None) -> None:
        """Join the trainers' process group (when there is more than one rank, or under DeepSpeed), build the
        optimizer and the engine. A single rank calls it itself."""
        if self.world_size > 1 or self.strategy == "deepspeed":
            distributed.init_process_group(self.rank, self.world_size, tuple(address or self.address()))
        params = [p for p in self.policy.parameters() if p.requires_grad]
        # The fused kernel exists for CPU and CUDA fp32 weights (4x faster than the per-tensor loop on CPU).
        optimizer = torch.optim.AdamW(params, lr=self.lr_args["base_lr"], weight_decay=self.weight_decay,
                                      fused=True)
        if self.strategy == "deepspeed":
            self.engine = distributed.DeepSpeedEngine(self.policy, optimizer, self.max_grad_norm, self.compute_dtype,
                                                      self.zero_stage, self.micro_batch_size)
        else:
            self.engine = distributed.TorchEngine(self.policy, optimizer, self.max_grad_norm, self.compute_dtype,
                                                  self.world_size)

    def ready(self) -> bool:
        return True

    # ---- the update ---------------------------------------------------------------------------------------

    def _pack(self, batch: TrainBatch, micro: batching.MicroBatch) -> batching.PackedBatch:
        return batching.pack_batch(batch, micro.rows, self.tokenizer.pad_token_id, micro.empty)

    def _forward(self, packed: batching.PackedBatch, model: Any = None, last: bool = True,
                 own_distribution: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Response-token log-probs [b, C], response mask [b, C] and entropy [b, C] of one packed micro-batch.

        `model=None` is the trained policy through its engine (gradient-synchronising on the `last`
        micro-batch); otherwise that module is called directly (no-grad passes). Log-probs and entropy are the
        sampler's (temperature, top-p), or with `own_distribution` the model's own (temperature 1, top-p 1);
        both keep their gradient, the entropy's costs nothing unless it reaches the loss. The model returns
        its last hidden states (no logits: `logits_to_keep` selects none) and `head_scores` runs the LM head
        on the scored positions only, in chunks.
        """
        device = self.policy.device
        # The layout as a prepared mask (HF's dict form), read by the packed attention of every layer.
        inputs = dict(input_ids=packed.input_ids.to(device),
                      attention_mask={"full_attention": packed.attention.to(device)},
                      position_ids=packed.position_ids.to(device), output_hidden_states=True,
                      logits_to_keep=torch.zeros(0, dtype=torch.long, device=device))
        with self.engine.autocast():
            out = self.engine.forward(last=last, **inputs) if model is None else model(**inputs)
            hidden = out.hidden_states[-1].flatten(0, 1)[packed.scored.to(device)]  # [N, H], after the final norm
            temperature, top_p = (1.0, 1.0) if own_distribution else (self.temperature, self.top_p)
            head = (self._unwrapped() if model is None else model).get_output_embeddings()
            lp, entropy = head_scores(hidden, head, packed.targets.to(device), temperature, top_p,
                                      fused=not (self.strategy == "deepspeed" and self.zero_stage == 3))
        mask = packed.response_mask.to(device)
        # Back to [b, C] in the mask's row-major order (masked_scatter keeps an all-empty micro-batch connected).
        select = mask.bool()
        return (mask.new_zeros(mask.shape).masked_scatter(select, lp), mask,
                mask.new_zeros(mask.shape).masked_scatter(select, entropy))

    @torch.no_grad()
    def _reference_forward(self, packed: batching.PackedBatch, own_distribution: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Response-token log-probs [b, C] and mask [b, C] of one micro-batch under the reference."""
        if self.reference is not None:
            return self._forward(packed, model=self.reference, own_distribution=own_distribution)[:2]
        with self.policy.disable_adapter():  # LoRA: the base model is the reference
            return self._forward(packed, model=self.policy, own_distribution=own_distribution)[:2]

    def _reference_logprobs(self, packed: batching.PackedBatch) -> torch.Tensor | None:
        return self._reference_forward(packed)[0] if self.kl_coef > 0 else None

    @torch.no_grad()
    def reference_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """A fluency measure: per sequence of this rank's share (rows rank, rank + world_size, ...), the
        log-probs of its response tokens under the frozen starting policy (the KL term's reference) at
        temperature 1 and top-p 1, the model's own distribution rather than the sampler's ([] for an empty
        response; `scoring.fluency_summary` gives the gate's minimum and the monitor's mean). Every rank must
        call it: each runs the same number of micro-batches (a short rank pads with a dummy row), since under
        ZeRO-3 a LoRA base forward gathers weights collectively. Needs `kl_coef > 0` or
        `reference_scoring`."""
        if not self.has_reference:
            raise RuntimeError("PolicyTrainer.reference_logprobs needs the reference model: construct the "
                               "trainer with reference_scoring=True (or kl_coef > 0)")
        start = time.time()
        rows = list(range(self.rank, len(batch.input_ids), self.world_size))
        size = self.micro_batch_size
        out: list[list[float]] = []
        for k in range(math.ceil(math.ceil(len(batch.input_ids) / self.world_size) / size)):
            part = rows[k * size: (k + 1) * size]
            micro = batching.MicroBatch(part, [False] * len(part)) if part else batching.MicroBatch([0], [True])
            lp, mask = self._reference_forward(self._pack(batch, micro), own_distribution=True)
            if part:
                out += [lp[b][mask[b].bool()].tolist() for b in range(len(part))]
        self.compute_intervals.append((start, time.time()))
        return out

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One GSPO/GRPO update over a rollout batch (every rank gets the whole batch).

        Returns this rank's metrics: loss terms, clip fractions, ratio mean/max, entropy, KL, gradient norm,
        learning rate, tokens and tokens/s, with the counts `merge_rank_metrics` weights them by: `loss_terms`
        (micro-batch losses averaged; 0 on a rank that held only padding, which then reports no loss metrics),
        `tokens` and `rollout_logprob_tokens` (the first minibatch's tokens, compared with the engine's).
        """
        if self.engine is None:
            raise RuntimeError("PolicyTrainer.connect() must run before train_step()")
        penalised = self.unlikelihood_coef > 0 or self.implausible_mass_coef > 0
        reference = batch.reference_logprobs if penalised else None
        if penalised and reference is None:
            raise ValueError("the unlikelihood and implausible-mass terms need the batch's reference token "
                             "log-probs (TrainBatch.reference_logprobs, from "
                             "scoring.with_reference_logprobs)")
        start = time.time()
        self.steps_done += 1
        lr = lr_at(self.steps_done, **self.lr_args)
        mode, aggregation = self.loss_kwargs["mode"], self.loss_kwargs["aggregation"]
        prompts = [tuple(ids[:n]) for ids, n in zip(batch.input_ids, batch.prompt_lens)]
        steps = batching.assign(len(batch.input_ids), self.minibatches, self.world_size, self.rank,
                                self.micro_batch_size, self.generator, prompts)
        advantages = torch.tensor(batch.advantages, dtype=torch.float32)
        packs = {id(m): self._pack(batch, m) for _, micros in steps for m in micros}  # once per train call
        # pi_old of the off-policy minibatches, before any weight changes (the first one uses its own forward).
        with torch.no_grad():
            old = {id(m): self._forward(packs[id(m)], model=self._unwrapped())[0] for _, micros in steps[1:]
                   for m in micros}
        sums: dict[str, float] = {}
        terms, grad_norms, ratio_max = 0, [], -math.inf
        tokens = entropy = mismatch = first_tokens = 0.0
        ul_tokens = ul_sum = ul_prob = 0.0
        for index, (rows, micros) in enumerate(steps):
            lengths = torch.tensor([len(batch.input_ids[i]) - batch.prompt_lens[i] for i in rows])
            global_count = max(1.0, batching.loss_count(
                (torch.arange(max(1, int(lengths.max()))) < lengths[:, None]).float(), mode, aggregation))
            # The unlikelihood term's N: the minibatch's implausible tokens, on every rank.
            ul_count = count_implausible(reference, rows, self.implausible_logprob) if reference else 0
            for k, micro in enumerate(micros):
                last = k == len(micros) - 1
                packed = packs.pop(id(micro))
                lp, mask, per_token = self._forward(packed, last=last)
                old_lp = lp.detach() if index == 0 else old.pop(id(micro))
                # The entropy term (a bonus, or a penalty when negative) takes the entropy with its gradient;
                # otherwise it is only a metric (from the same LM-head chunks, its gradient never computed).
                bonus = per_token if self.entropy_coef != 0 else None
                loss, m = policy_loss(lp, old_lp, advantages[micro.rows].to(lp.device), mask, **self.loss_kwargs,
                                      kl_coef=self.kl_coef, ref_logprobs=self._reference_logprobs(packed),
                                      entropy=bonus, entropy_coef=self.entropy_coef)
                local_count = batching.loss_count(mask, mode, aggregation)
                # Weighted by its share of the minibatch, summed over micro-batches and ranks (see batching.py).
                loss = loss * (local_count / global_count)
                if reference is not None:  # already shares of the minibatch's (over its ul_count, its rows)
                    flagged = implausible_mask(reference, micro.rows, mask.shape[1], self.implausible_logprob)
                    flagged = flagged.to(mask.device) & mask.bool()
                    ul, ul_terms = unlikelihood_loss(lp, flagged, ul_count)
                    loss = loss + self.unlikelihood_coef * ul
                    if self.implausible_mass_coef > 0:
                        mass = implausible_mass_loss(lp, flagged, len(rows))
                        loss = loss + self.implausible_mass_coef * mass
                    ul_tokens += float(flagged.sum())
                    ul_sum += float(ul_terms.sum())
                    ul_prob += float((lp.detach().exp() * flagged).sum())
                self.engine.backward(loss * self.world_size, last)
                with torch.no_grad():
                    entropy += float((per_token * mask).sum())
                    tokens += float(mask.sum())
                    if index == 0:
                        mismatch += _engine_mismatch(old_lp, mask, batch, micro)
                        first_tokens += float(mask.sum())
                if local_count:
                    ratio_max = max(ratio_max, m.pop("ratio_max"))
                    for key, value in m.items():
                        sums[key] = sums.get(key, 0.0) + value
                    terms += 1
                del per_token, lp, loss
            grad_norms.append(self.engine.step(lr))
        metrics = {k: v / terms for k, v in sums.items()} | ({"ratio_max": ratio_max} if terms else {})
        if reference is not None:  # over the implausible tokens: -log(1 - p) and p under the current policy
            metrics.update(unlikelihood=ul_sum / max(1.0, ul_tokens),
                           implausible_prob=ul_prob / max(1.0, ul_tokens), implausible_tokens=ul_tokens)
        metrics.update(grad_norm=sum(grad_norms) / len(grad_norms), lr=lr, loss_terms=float(terms), tokens=tokens,
                       entropy=entropy / max(1.0, tokens), rollout_logprob_tokens=first_tokens,
                       rollout_logprob_abs_diff=mismatch / max(1.0, first_tokens),
                       tokens_per_s=tokens / max(1e-9, time.time() - start))
        self.compute_intervals.append((start, time.time()))
        return metrics

    def _unwrapped(self) -> torch.nn.Module:
        return self.engine.module if self.engine is not None else self.policy

    @torch.no_grad()
    def sequence_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """Log-probs of each response token under the current weights (at the sampling temperature and top-p)."""
        micro = batching.MicroBatch(list(range(len(batch.input_ids))), [False] * len(batch.input_ids))
        lp, mask, _ = self._forward(self._pack(batch, micro), model=self._unwrapped())
        return [lp[i][mask[i].bool()].tolist() for i in range(len(batch.input_ids))]

    # ---- weights and state --------------------------------------------------------------------------------

    def state_blob(self) -> bytes:
        """The current full weights (adapters merged) as a safetensors blob with HF names; b"" off rank 0.

        Every rank must call it: under ZeRO-3 gathering the weights is collective.
        """
        start = time.time()
        with self.engine.full_weights():
            blob = state_dict_blob(lora.merged_state_dict(self._unwrapped())) if self.rank == 0 else b""
        self.compute_intervals.append((start, time.time()))
        return blob

    def weight_layout(self) -> list[tuple[str, int]]:
        """(HF name, bytes) of every weight `weight_bucket` can send, in the model's order (adapters merged)."""
        params = lora.export_parameters(self._unwrapped())
        return [(name, self.engine.numel(ps[0]) * ps[0].element_size()) for name, ps in params.items()]

    def weight_bucket(self, names: list[str]) -> WeightBucket | None:
        """The current weights `names` (adapters merged) as one bucket; None off rank 0.

        Every rank must call it with the same names: under ZeRO-3 only these parameters are gathered (and
        copied out before they are released); otherwise the bucket views the live weights.
        """
        start = time.time()
        params = lora.export_parameters(self._unwrapped())
        needed = list({id(p): p for name in names for p in params[name]}.values())
        bucket = None
        with self.engine.full_weights(needed):
            if self.rank == 0:
                tensors = lora.merged_tensors(self._unwrapped(), names)
                if self.engine.sharded:
                    tensors = [(name, t.detach().clone()) for name, t in tensors]
                bucket = pack_bucket(tensors)
        self.compute_intervals.append((start, time.time()))
        return bucket

    def pop_compute(self) -> list[tuple[float, float]]:
        """Model compute since the last pop: (start, end) `time.time()` intervals, for `tracking.step_timing`."""
        out, self.compute_intervals = self.compute_intervals, []
        return out

    def save(self, directory: str, export: str = "merged") -> None:
        """Write this rank's part of a resumable checkpoint into `directory` (every rank must call it).

        Rank 0 writes the HF export at the top level (`export`: `merged` full weights, or `adapter` for the
        peft adapter alone) with the tokenizer; `trainer/` holds the engine state (model, optimizer) and each
        rank's RNG and step counter. The caller makes the directory's appearance atomic.
        """
        root = Path(directory)
        state_dir = root / "trainer"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.engine.save(str(state_dir))
        torch.save({"steps_done": self.steps_done, "generator": self.generator.get_state(),
                    "torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   state_dir / f"rank{self.rank}.pt")
        with self.engine.full_weights():
            if self.rank == 0:
                model = self._unwrapped()
                if export == "adapter" and lora.is_lora(model):
                    model.save_pretrained(root)
                else:
                    base = model.get_base_model() if lora.is_lora(model) else model
                    base.save_pretrained(root, state_dict=lora.merged_state_dict(model))
                self.tokenizer.save_pretrained(root)

    def load(self, directory: str) -> int:
        """Restore the state `save` wrote (same world size); returns the step counter."""
        state_dir = Path(directory) / "trainer"
        rank_file = state_dir / f"rank{self.rank}.pt"
        if not rank_file.exists():
            raise FileNotFoundError(f"{rank_file} is missing: the checkpoint was written by a different number "
                                    f"of trainer workers than trainer.workers={self.world_size}")
        self.engine.load(str(state_dir))
        state = torch.load(rank_file, weights_only=False)
        self.steps_done = state["steps_done"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])
        return self.steps_done


def _engine_mismatch(old: torch.Tensor, mask: torch.Tensor, batch: TrainBatch, micro: batching.MicroBatch) -> float:
    """Sum over response tokens of |trainer log-prob - rollout engine log-prob| (0 where none was given)."""
    behaviour = torch.zeros_like(old)
    for b, row in enumerate(micro.rows):
        lps = batch.old_logprobs[row][: old.shape[1]]
        behaviour[b, : len(lps)] = torch.tensor(lps, dtype=old.dtype)
    return float(((old - behaviour).abs() * mask).sum())


# What a rank metric is a mean over: merged means are weighted by it, so a rank whose share was only padding
# (count 0) does not pull them towards its zeros. Unlisted metrics (pg_loss, clip fractions, ratio_mean, kl, and
# grad_norm and lr, which every rank shares) are means over the rank's micro-batch loss terms.
MEAN_OVER = {"entropy": "tokens", "rollout_logprob_abs_diff": "rollout_logprob_tokens",
             "unlikelihood": "implausible_tokens", "implausible_prob": "implausible_tokens"}
SUMMED = ("loss_terms", "tokens", "rollout_logprob_tokens", "tokens_per_s", "implausible_tokens")


def merge_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One value per metric across data-parallel ranks: counts (and tokens/s) summed, the max of maxima, every
    other metric the mean over all ranks' tokens or loss terms (`MEAN_OVER`) - as one rank would report it.

    A rank whose share was only dummy rows has no loss terms and reports no loss metrics. Where no rank has any
    count (every response empty) a mean falls back to the plain mean over ranks.
    """
    merged = {}
    for key in dict.fromkeys(k for m in per_rank for k in m):
        ranks = [m for m in per_rank if key in m]
        values = [m[key] for m in ranks]
        if key in SUMMED:
            merged[key] = sum(values)
        elif key.endswith("_max"):
            merged[key] = max(values)
        else:
            weights = [m[MEAN_OVER.get(key, "loss_terms")] for m in ranks]
            total = sum(weights)
            merged[key] = (sum(w * v for w, v in zip(weights, values)) / total if total > 0
                           else sum(values) / len(values))
    return merged
