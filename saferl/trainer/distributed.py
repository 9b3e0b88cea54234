"""The training engines a PolicyTrainer can sit on: plain torch (DDP across ranks) or DeepSpeed ZeRO.

Owns process-group set-up, wrapping the model, and the three operations whose mechanics differ between the
two: backward with or without gradient sync, the optimizer step (with clipping), and gathering full weights.
Both expose the same `TrainingEngine` protocol, so `PolicyTrainer` has no branches on the strategy (the
sampling engines of `saferl.engines` are a different thing: `saferl.engines.Engine`).

- `TorchEngine`: fp32 master weights; bf16 via autocast on GPU. With world_size > 1 the model is wrapped in
  `DistributedDataParallel` (gloo on CPU, NCCL on GPU) and `no_sync` skips the all-reduce on all but the last
  micro-batch. Runs everywhere, including machines without DeepSpeed.
- `DeepSpeedEngine`: ZeRO stage 0-3 from config (stage <= 2 also runs on CPU over gloo); the gradient
  accumulation boundary is set by hand because the number of micro-batches varies from step to step. Under
  ZeRO-3 the full weights are gathered for export, and for weight sync one bucket of parameters at a time.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta
from typing import Any, Iterator, Protocol

import torch


def rendezvous_address() -> tuple[str, int]:
    """This node's address and a free TCP port, for rank 0 to host the process-group store."""
    import ray

    # Inside a Ray actor the other ranks may be on other nodes; a local run stays on loopback.
    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    with socket.socket() as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


def init_process_group(rank: int, world_size: int, address: tuple[str, int]) -> None:
    """Join the trainers' torch.distributed group (NCCL with CUDA, else gloo)."""
    import torch.distributed as dist

    if dist.is_initialized() and world_size == 1 == dist.get_world_size():
        return  # a second single-process trainer in this process (a notebook, a test) shares the group
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # What torchrun would set; DeepSpeed reads them. Ray gives each actor its own GPU, so the local rank is 0.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR=address[0],
                      MASTER_PORT=str(address[1]))
    dist.init_process_group(backend, init_method=f"tcp://{address[0]}:{address[1]}", rank=rank,
                            world_size=world_size, timeout=timedelta(minutes=30))


class TrainingEngine(Protocol):
    """What `PolicyTrainer` drives: forward/backward/step of the policy under one parallelism strategy."""

    module: torch.nn.Module  # the unwrapped model (peft model under LoRA)

    def forward(self, *, last: bool, **inputs: Any) -> Any: ...
    def autocast(self) -> contextlib.AbstractContextManager[None]: ...
    def backward(self, loss: torch.Tensor, last: bool) -> None: ...
    def step(self, lr: float) -> float: ...
    sharded: bool  # weights live in shards: `full_weights` gathers them, and they are released after it

    def full_weights(self, params: list[torch.nn.Parameter] | None = None
                     ) -> contextlib.AbstractContextManager[None]: ...
    def numel(self, param: torch.nn.Parameter) -> int: ...
    def save(self, directory: str) -> None: ...
    def load(self, directory: str) -> None: ...


class TorchEngine:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                 compute_dtype: torch.dtype, world_size: int) -> None:
        self.module = model
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm
        self.compute_dtype = compute_dtype
        self.rank = 0
        self.wrapped: torch.nn.Module = model
        if world_size > 1:
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel

            self.rank = dist.get_rank()
            self.wrapped = DistributedDataParallel(model, device_ids=[model.device] if model.device.type == "cuda"
                                                   else None)
        self._pending_sync = contextlib.ExitStack()

    def forward(self, *, last: bool, **inputs: Any) -> Any:
        """Forward for a micro-batch; on all but the `last` one DDP defers the gradient all-reduce."""
        self._pending_sync.close()
        if not last and self.wrapped is not self.module:
            self._pending_sync.enter_context(self.wrapped.no_sync())
        return self.wrapped(**inputs)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """bf16/fp16 compute over fp32 weights on GPU; every forward (pi_old, reference) uses the same."""
        if self.module.device.type == "cuda" and self.compute_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()
        self._pending_sync.close()

    def step(self, lr: float) -> float:
        """Clip, then one optimizer step at learning rate `lr`; returns the gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    sharded = False

    @contextlib.contextmanager
    def full_weights(self, params: list[torch.nn.Parameter] | None = None) -> Iterator[None]:
        yield  # every rank holds the whole model

    def numel(self, param: torch.nn.Parameter) -> int:
        return param.numel()

    def save(self, directory: str) -> None:
        """Model and optimizer state (identical on every rank, so rank 0 writes them)."""
        if self.rank == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                       os.path.join(directory, "engine.pt"))

    def load(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, "engine.pt"), map_location=self.module.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class DeepSpeedEngine:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                 compute_dtype: torch.dtype, zero_stage: int, micro_batch_size: int) -> None:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": 1,  # the boundary is set per micro-batch instead (see module doc)
            "gradient_clipping": max_grad_norm,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": compute_dtype == torch.bfloat16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.module = self.engine.module
        self.zero_stage = zero_stage

    def forward(self, *, last: bool, **inputs: Any) -> Any:
        self.engine.set_gradient_accumulation_boundary(last)
        return self.engine(**inputs)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # DeepSpeed casts the module itself

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float) -> float:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()  # clips, steps the optimizer, zeroes the gradients
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def sharded(self) -> bool:
        return self.zero_stage == 3

    @contextlib.contextmanager
    def full_weights(self, params: list[torch.nn.Parameter] | None = None) -> Iterator[None]:
        """`params` (all of the model's by default) whole on every rank inside the block; under ZeRO-3 every
        rank must enter it with the same list (the gather is collective)."""
        if self.zero_stage < 3:
            yield
            return
        import deepspeed

        gather = list(self.module.parameters()) if params is None else params
        with deepspeed.zero.GatheredParameters(gather, modifier_rank=None):
            yield

    def numel(self, param: torch.nn.Parameter) -> int:
        """The full parameter's size (under ZeRO-3 this rank holds a partition of it)."""
        return param.ds_numel if self.zero_stage == 3 else param.numel()

    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag="deepspeed", save_latest=False)

    def load(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag="deepspeed", load_optimizer_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint (tag 'deepspeed') to resume from")
