"""PolicyTrainer: holds the policy and its optimizer; recomputes log-probs and applies the GSPO update.

One `train_step` per rollout batch: pi_old is recomputed by this model (no grad), then the batch is split
into `minibatches` random chunks, one optimizer step each. Every chunk after the first is off-policy, which
is where GSPO's sequence-ratio clip acts (with one chunk the ratio is exactly 1 and nothing clips).
The rollout engine's own log-probs are only compared against pi_old, as a health metric.

A plain class: Ray hosts it as an actor, `executor: local` instantiates it in-process.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from saferl.rollout.weights import state_dict_blob
from saferl.runtime import check_model_dir, configure_process
from saferl.trainer.gspo import policy_loss, token_logprobs, warn_if_misconfigured
from saferl.types import TrainBatch


def pad_batch(batch: TrainBatch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tensors for a TrainBatch.

    Returns:
        input_ids [N, L], attention_mask [N, L], response_mask [N, L-1] where position t of the mask marks
        that token t+1 is a response token (the layout of `token_logprobs`).
    """
    width = max(map(len, batch.input_ids))
    n = len(batch.input_ids)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    resp = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, (seq, plen) in enumerate(zip(batch.input_ids, batch.prompt_lens)):
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        resp[i, plen - 1 : len(seq) - 1] = 1.0
    return ids, attn, resp


class PolicyTrainer:
    """The policy being trained (HF causal LM), its AdamW optimizer and the GSPO/GRPO update."""

    def __init__(self, model: str, *, lr: float = 3e-4, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                 minibatches: int = 2, loss: str = "gspo", clip_low: float = 3e-4, clip_high: float = 4e-4,
                 aggregation: str = "seq-mean-token-mean", temperature: float = 1.0, dtype: str = "float32",
                 kl_coef: float = 0.0, seed: int = 0) -> None:
        configure_process()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_model_dir(model)
        torch.manual_seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
        if torch.cuda.is_available():
            self.model.cuda()
        self.model.train()
        # A frozen copy of the starting policy, only when a KL penalty asks for it (GSPO's default has none).
        self.reference = None
        if kl_coef > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
            self.reference.to(self.model.device).eval().requires_grad_(False)
        self.kl_coef = kl_coef
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm
        self.minibatches = minibatches
        self.loss_kwargs = dict(mode=loss, clip_low=clip_low, clip_high=clip_high, aggregation=aggregation)
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.compute_seconds: list[float] = []
        self.warning = warn_if_misconfigured(loss, aggregation)
        if self.warning:
            print(f"[saferl] warning: {self.warning}", flush=True)

    def _logprobs(self, ids: torch.Tensor, attn: torch.Tensor, model: torch.nn.Module | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs [N, L-1] of each next token and the logits they came from (of `model`, default the policy)."""
        device = self.model.device
        logits = (model or self.model)(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        return token_logprobs(logits, ids.to(device), self.temperature), logits

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One GSPO update over a rollout batch; returns loss, clip, ratio, entropy and timing metrics."""
        start = time.monotonic()
        ids, attn, mask = pad_batch(batch, self.tokenizer.pad_token_id)
        mask = mask.to(self.model.device)
        advantages = torch.tensor(batch.advantages, dtype=torch.float32, device=self.model.device)
        with torch.no_grad():
            old, logits = self._logprobs(ids, attn)
            probs = torch.softmax(logits[:, :-1].float() / self.temperature, dim=-1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
            del logits, probs
            ref = self._logprobs(ids, attn, self.reference)[0] if self.reference is not None else None
        metrics: dict[str, float] = {
            "entropy": float((entropy * mask).sum() / mask.sum()),
            "rollout_logprob_abs_diff": self._engine_mismatch(old, mask, batch),
        }
        sums: dict[str, float] = {}
        chunks = torch.randperm(len(batch.input_ids), generator=self.generator).chunk(self.minibatches)
        for idx in chunks:
            lp, _ = self._logprobs(ids[idx], attn[idx])
            loss, m = policy_loss(lp, old[idx], advantages[idx], mask[idx], **self.loss_kwargs,
                                  ref_logprobs=None if ref is None else ref[idx], kl_coef=self.kl_coef)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            m.update(loss=loss.item(), grad_norm=grad_norm.item())
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        metrics.update({k: v / len(chunks) for k, v in sums.items()})
        metrics["ratio_max"] = sums.get("ratio_max", 0.0) / len(chunks)
        tokens = int(mask.sum())
        metrics["tokens"] = float(tokens)
        metrics["tokens_per_s"] = tokens / max(1e-9, time.monotonic() - start)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.compute_seconds.append(time.monotonic() - start)
        return metrics

    @torch.no_grad()
    def sequence_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """Log-probs of each response token under the current weights (at the sampling temperature)."""
        ids, attn, mask = pad_batch(batch, self.tokenizer.pad_token_id)
        lp, _ = self._logprobs(ids, attn)
        return [lp[i][mask[i].bool()].tolist() for i in range(len(batch.input_ids))]

    def _engine_mismatch(self, old: torch.Tensor, mask: torch.Tensor, batch: TrainBatch) -> float:
        """Mean |trainer log-prob - rollout engine log-prob| over response tokens (0 when none given)."""
        behaviour = torch.zeros_like(old)
        for i, (plen, lps) in enumerate(zip(batch.prompt_lens, batch.old_logprobs)):
            behaviour[i, plen - 1 : plen - 1 + len(lps)] = torch.tensor(lps, dtype=old.dtype)
        return float(((old - behaviour).abs() * mask).sum() / mask.sum())

    def state_blob(self) -> bytes:
        """The current weights as a safetensors blob (HF names) for the rollout engines."""
        start = time.monotonic()
        blob = state_dict_blob(self.model.state_dict())
        self.compute_seconds.append(time.monotonic() - start)
        return blob

    def pop_compute(self) -> list[float]:
        """Seconds spent in model compute per call since the last pop (for overhead accounting)."""
        out, self.compute_seconds = self.compute_seconds, []
        return out

    def save(self, path: str) -> str:
        """Write an HF checkpoint (model, tokenizer, chat template) atomically: temp dir, then rename."""
        final = Path(path)
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return str(final)

    def ready(self) -> bool:
        return True
