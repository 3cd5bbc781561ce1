"""Optimizer-side engines behind one interface: plain PyTorch (single process or DDP) and DeepSpeed ZeRO.

Both expose ``forward`` (the policy), ``reference_forward`` (frozen reference adapter, no gradients), ``backward``,
``step`` (returns whether an optimizer step happened at this micro-step), and pickle-free ``state`` /
``load_state`` for checkpoints.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from patchdpo_fast.training.distributed import DistEnv

__all__ = ["DeepSpeedEngine", "PlainEngine"]


class PlainEngine:
    """PyTorch optimizer with gradient accumulation, grad-norm clipping, fp16 loss scaling and optional DDP."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        env: DistEnv,
        accumulation_steps: int,
        max_grad_norm: float | None,
        mixed_precision: str,
        reference: nn.Module | None = None,
    ) -> None:
        self.module = module
        #: a separate frozen reference model (full UNet finetuning with a DPO loss); None: the reference lives in
        #: ``module`` (``use_reference=True``: the reference adapter, the UNet with its LoRA off)
        self.reference = reference
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.env = env
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.scaler = torch.amp.GradScaler(env.device.type) if mixed_precision == "fp16" else None
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._micro = 0
        self._poisoned = False  # a micro-batch of the current accumulation window had a non-finite loss
        self._sync_ctx: Any = contextlib.nullcontext()
        self.last_grad_norm: float | None = None
        self.wrapped: nn.Module = module
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(
                module, device_ids=[env.local_rank] if env.device.type == "cuda" else None
            )

    def _boundary(self) -> bool:
        return (self._micro + 1) % self.accumulation_steps == 0

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        sync = self._boundary() or not self.env.distributed
        ctx = contextlib.nullcontext() if sync else self.wrapped.no_sync()  # type: ignore[operator]
        self._sync_ctx = ctx
        ctx.__enter__()
        return self.wrapped(*args, **kwargs)

    @torch.no_grad()
    def reference_forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The frozen reference model's prediction (no gradients)."""
        if self.reference is not None:
            return self.reference(*args, use_reference=False, **kwargs)
        return self.module(*args, use_reference=True, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.accumulation_steps
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        self._sync_ctx.__exit__(None, None, None)

    def skip_micro_step(self) -> None:
        """A micro-batch's loss was not finite: no backward for it, and no optimizer step for its window."""
        self._sync_ctx.__exit__(None, None, None)
        self._poisoned = True

    def step(self) -> bool:
        boundary = self._boundary()
        self._micro += 1
        if not boundary:
            return False
        if self._poisoned:
            self._poisoned = False
            self.optimizer.zero_grad(set_to_none=True)
            return False
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        self.last_grad_norm = float(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoint state (identical on every rank: rank 0 writes it) ---------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``(global_state, per_rank_state)``; the plain engine has no per-rank state."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "micro": self._micro,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state, None

    def load_state(self, state: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._micro = int(state["micro"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    @contextlib.contextmanager
    def gathered(self, params: Any = None) -> Any:
        """Full parameters available on this rank (a no-op without ZeRO-3)."""
        yield

    @contextlib.contextmanager
    def master_weights(self) -> Any:
        """The trainable parameters hold their fp32 master values (a no-op: they always do here)."""
        yield


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the adapter-bearing UNet (ZeRO stage and precision from the resolved JSON)."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler_factory: Any,
        ds_config: dict[str, Any],
        env: DistEnv,
    ) -> None:
        import deepspeed

        params = [p for p in module.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=scheduler_factory,
            config=ds_config,
            dist_init_required=False,
        )
        self.module = self.engine.module
        self.env = env
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.last_grad_norm: float | None = None
        #: a separate frozen reference model, set by the trainer (a DeepSpeed inference engine under ZeRO-3)
        self.reference: nn.Module | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.engine(*args, **kwargs)

    @torch.no_grad()
    def reference_forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The frozen reference model's prediction (no gradients)."""
        if self.reference is not None:
            return self.reference(*args, use_reference=False, **kwargs)
        return self.module(*args, use_reference=True, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself

    def skip_micro_step(self) -> None:
        """Drop a micro-batch whose loss was not finite (no backward and no step for it)."""

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self.last_grad_norm = None if norm is None else float(norm)
        return boundary

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def _fp32_partitions(self) -> list[torch.Tensor] | None:
        opt = self.engine.optimizer
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            if hasattr(opt, name):
                return list(getattr(opt, name))
        return None

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Global state (rank 0) and this rank's ZeRO partition state (fp32 master weights, base optimizer)."""
        opt = self.engine.optimizer
        scaler = getattr(opt, "loss_scaler", None)
        scaler_state = {
            k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool)) and not k.startswith("_")
        } if scaler is not None else {}  # fmt: skip
        global_state = {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "global_steps": int(self.engine.global_steps),
            "global_samples": int(self.engine.global_samples),
            "micro_steps": int(self.engine.micro_steps),
            "loss_scaler": scaler_state,
            "zero_stage": self.zero_stage,
        }
        parts = self._fp32_partitions()
        if parts is not None:
            # The base optimizer's state is keyed by the fp32 partition tensors; ZeRO-3 swaps its param_groups while
            # stepping, so the per-partition state is read directly rather than through optimizer.state_dict().
            base_state = opt.optimizer.state
            rank_state = {"fp32_partitions": parts, "optimizer_states": [dict(base_state.get(p, {})) for p in parts]}
        else:
            rank_state = {"optimizer": opt.state_dict()}
        rank_state["world_size"] = self.env.world_size
        return global_state, rank_state

    def load_state(self, state: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
        if rank_state is None:
            raise FileNotFoundError(f"checkpoint has no DeepSpeed state for rank {self.env.rank}")
        if rank_state.get("world_size") != self.env.world_size:
            raise ValueError(
                f"checkpoint was written by {rank_state.get('world_size')} ranks; resuming ZeRO partitions needs "
                f"the same number of ranks, got {self.env.world_size}"
            )
        opt = self.engine.optimizer
        parts = self._fp32_partitions()
        if parts is not None:
            saved = rank_state["fp32_partitions"]
            if [p.shape for p in parts] != [s.shape for s in saved]:
                raise ValueError("checkpoint ZeRO partitions do not match this run's layout (different config?)")
            for dst, src, st in zip(parts, saved, rank_state["optimizer_states"], strict=True):
                dst.data.copy_(src.to(dst.device, dst.dtype))
                opt.optimizer.state[dst] = {
                    k: v.to(dst.device) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in st.items()
                }
            bit16 = getattr(opt, "fp16_partitioned_groups_flat", None)  # ZeRO-3 low-precision partitions
            if bit16 is not None:
                for dst, src in zip(bit16, parts, strict=True):
                    dst.data.copy_(src.to(dst.dtype))
        else:
            opt.load_state_dict(rank_state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
            # load_state_dict restores the schedule's position but not the learning rate it last set
            for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        self.engine.global_steps = int(state["global_steps"])
        self.engine.global_samples = int(state["global_samples"])
        self.engine.micro_steps = int(state["micro_steps"])
        scaler = getattr(opt, "loss_scaler", None)
        for key, value in state.get("loss_scaler", {}).items():
            if scaler is not None and hasattr(scaler, key):
                setattr(scaler, key, value)

    @contextlib.contextmanager
    def gathered(self, params: Any = None) -> Any:
        """Gather ZeRO-3 partitioned parameters so they can be read whole (export, checkpoints, sample grids).

        ``params``: the parameters to gather (default every parameter of the module); each rank holds them whole for
        the duration of the block.
        """
        if self.zero_stage == 3:
            import deepspeed

            chosen = list(self.module.parameters()) if params is None else list(params)
            with deepspeed.zero.GatheredParameters(chosen, modifier_rank=None):
                yield
        else:
            yield

    @contextlib.contextmanager
    def master_weights(self, keep_on: int | None = 0) -> Any:
        """On rank ``keep_on`` (every rank with None) the trainable parameters read as their fp32 master values.

        Under DeepSpeed bf16 / fp16 the module's parameters are the low-precision working copies; the fp32 masters
        live, partitioned, in the optimizer. For exports (``train.export_dtype=fp32`` is then exact, and an fp16 export
        is rounded from fp32, not from bf16) each trainable parameter's master is assembled (one collective per
        parameter: every rank must enter this together; under ZeRO-3 inside :meth:`gathered`), moved to the host and
        swapped in for the duration of the block, one fp32 copy of what trains in host memory on the keeping rank.
        A no-op without low-precision training.
        """
        if not (self.engine.bfloat16_enabled() or self.engine.fp16_enabled()):
            yield
            return
        from deepspeed.utils import safe_get_full_fp32_param

        swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            for param in self.module.parameters():
                if not param.requires_grad:
                    continue
                full = safe_get_full_fp32_param(param)  # collective
                if full is None or (keep_on is not None and self.env.rank != keep_on):
                    continue
                swapped.append((param, param.data))
                param.data = full.detach().to("cpu", torch.float32).reshape(param.data.shape)
                del full
            yield
        finally:
            for param, data in swapped:
                param.data = data
