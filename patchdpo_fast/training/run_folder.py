"""A run's output folder: which run owns it, which checkpoint a resume continues from (skipping corrupt ones), and
the checks made before any model loads."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchdpo_fast.config import TrainConfig, config_to_dict
from patchdpo_fast.errors import UserError
from patchdpo_fast.training.checkpoint import (
    CheckpointError,
    checkpoint_run_id,
    find_checkpoint,
    list_checkpoints,
    new_run_id,
    quarantine_checkpoint,
    trainer_state_problems,
    verify_checkpoint,
)
from patchdpo_fast.training.distributed import DistEnv
from patchdpo_fast.training.resume import apply_optimizer_settings, check_resume_config
from patchdpo_fast.training.state_io import atomic_write_json

__all__ = [
    "RunFolderError",
    "RunRecord",
    "check_before_loading",
    "checkpoint_problems",
    "claim_output_dir",
    "reading_checkpoint",
    "saved_config",
    "select_checkpoint",
]

logger = logging.getLogger("patchdpo_fast.train")


class RunFolderError(UserError):
    """A fresh run was pointed at an output folder that holds another run's checkpoints."""


@dataclass
class RunRecord:
    """This run's identity (the run id recorded in its checkpoints) and what ``--resume`` found.

    Only rank 0 writes checkpoint manifests and prunes, so only its run id matters in a multi-rank job.
    """

    run_id: str
    checkpoint: Path | None = None
    changed: list[Any] = field(default_factory=list)  #: applied setting changes (resume.SettingChange)
    fixed_batch_loss_start: float | None = None

    def trainer_fields(self) -> dict[str, Any]:
        """What each checkpoint's trainer state records about the run."""
        return {"run_id": self.run_id, "fixed_batch_loss_start": self.fixed_batch_loss_start}

    def resumed(self, trainer: dict[str, Any], engine: Any, cfg: TrainConfig) -> None:
        """After the checkpoint's state is loaded: re-apply changed optimizer settings, keep the run's start loss."""
        value = trainer.get("fixed_batch_loss_start")
        self.fixed_batch_loss_start = None if value is None else float(value)
        keys = {change.key for change in self.changed}
        if keys:
            scheduler = getattr(engine, "scheduler", None)
            optimizer = scheduler.optimizer if scheduler is not None else engine.optimizer
            apply_optimizer_settings(optimizer, scheduler, cfg, keys)


def saved_config(ckpt: Path, strict: bool = True) -> dict[str, Any] | None:
    """The configuration a checkpoint was written with (its ``config.yaml``), None when it has none.

    An unreadable file raises :class:`CheckpointError`, or gives None with ``strict=False``.
    """
    import yaml

    file = ckpt / "config.yaml"
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        if not strict:
            return None
        raise CheckpointError(f"{file}: cannot read the checkpoint's config ({exc})") from None
    return data if isinstance(data, dict) else None


def remove_previous_run(out_dir: Path, root: Path, existing: list[tuple[int, Path]]) -> None:
    """``--overwrite``: delete the checkpoints and run outputs of the run that owned ``out_dir``."""
    removed = []
    if root.exists():
        shutil.rmtree(root)
        removed.append(f"{len(existing)} checkpoint(s) up to {existing[-1][1].name}")
    for name in ("ip_adapter.safetensors", "unet", "unet_lora", "summary.json", "metrics.jsonl", "run.json",
                 "tensorboard"):  # fmt: skip
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    logger.warning("--overwrite: removed the previous run from %s: %s", out_dir, ", ".join(removed))


def checkpoint_problems(ckpt: Path, env: DistEnv) -> list[str]:
    """This rank's share of the checks of a checkpoint: file checksums, then (rank 0) the trainer counters."""
    problems = verify_checkpoint(ckpt, rank=env.rank if env.distributed else None)
    if not problems and env.is_main:
        saved = saved_config(ckpt, strict=False) or {}
        data, loop = saved.get("data") or {}, saved.get("train") or {}
        per_step = None
        if isinstance(data.get("pairs_per_batch"), int) and isinstance(loop.get("gradient_accumulation_steps"), int):
            per_step = data["pairs_per_batch"] * loop["gradient_accumulation_steps"]
        problems = trainer_state_problems(ckpt, per_step)
    return problems


def select_checkpoint(out_dir: Path, resume: str, env: DistEnv) -> Path | None:
    """The checkpoint to resume: the one given (it must be intact) or, for ``latest``, the newest intact one.

    A corrupt newest checkpoint (a file missing, truncated or altered, nonsense counters) is skipped with a warning
    naming the file and moved aside (``step_N.corrupt``), so the run continues from the previous intact one.
    """
    if resume != "latest":
        ckpt = find_checkpoint(out_dir, resume)
        problems = checkpoint_problems(ckpt, env)
        if env.any(bool(problems)):
            raise CheckpointError(f"cannot resume {ckpt}: " + "; ".join(problems or ["a file failed its check"]))
        return ckpt
    candidates = [path for _, path in reversed(list_checkpoints(out_dir / "checkpoints"))]
    for ckpt in candidates:
        problems = checkpoint_problems(ckpt, env)
        if not env.any(bool(problems)):
            return ckpt
        env.barrier()  # every rank has checked before rank 0 moves the checkpoint away
        if env.is_main:
            aside = quarantine_checkpoint(ckpt)
            logger.warning("skipping corrupt checkpoint %s (moved to %s): %s", ckpt, aside.name,
                           "; ".join(problems or ["a file failed its check on another rank"]))  # fmt: skip
        env.barrier()
    if candidates:
        raise CheckpointError(
            f"no intact checkpoint in {out_dir / 'checkpoints'}: all {len(candidates)} failed their checks (see the "
            "warnings above; they were moved aside as step_N.corrupt)"
        )
    return None


@contextlib.contextmanager
def reading_checkpoint(path: Path) -> Iterator[None]:
    """Turn a failure to load a (verified) checkpoint into a :class:`CheckpointError` naming it."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from exc


def check_before_loading(cfg: TrainConfig, env: DistEnv) -> None:
    """Settings that can only be checked on this machine, checked before any model loads."""
    from patchdpo_fast.ops.dispatch import BACKENDS

    if cfg.loss.backend == "triton":
        reason = BACKENDS["triton"].unsupported_reason(env.device, {torch.float32})
        if reason is not None:
            raise UserError(f"loss.backend=triton cannot run here: {reason}; use loss.backend=auto or torch")
    if cfg.model.ip_adapter_path is not None:
        from patchdpo_fast.models.checks import check_ip_adapter_file

        check_ip_adapter_file(cfg.model.ip_adapter_path, "model.ip_adapter_path")
    if cfg.cache.enabled and Path(cfg.cache.dir).exists() and not Path(cfg.cache.dir).is_dir():
        raise UserError(f"cache.dir {cfg.cache.dir} is a file; expected a folder (created when missing)")


def claim_output_dir(cfg: TrainConfig, env: DistEnv, resume: str | None, overwrite: bool) -> RunRecord:
    """Find the checkpoint to resume (checking its settings) or make sure a fresh run owns its output folder."""
    out_dir = Path(cfg.train.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"train.output_dir {out_dir} is a file; expected a folder (created when missing)")
    root = out_dir / "checkpoints"
    ckpt = select_checkpoint(out_dir, resume, env) if resume else None
    if ckpt is not None:
        saved = saved_config(ckpt)
        changed = check_resume_config(saved, config_to_dict(cfg), str(ckpt)) if saved is not None else []
        if env.is_main:
            if saved is None:
                logger.warning("%s has no config.yaml: the resumed settings cannot be checked", ckpt)
            for change in changed:
                logger.warning("resume: setting changed since the checkpoint, applied: %s", change)
        run = RunRecord(checkpoint_run_id(ckpt) or new_run_id(), ckpt, changed)
    else:
        if resume is not None and env.is_main:
            logger.warning("--resume: no checkpoint in %s; starting a fresh run", root)
        existing = list_checkpoints(root)
        if existing and not overwrite:
            raise RunFolderError(
                f"train.output_dir {out_dir} already holds {len(existing)} checkpoint(s) of another run (newest: "
                f"{existing[-1][1]}); continue it with --resume, choose another train.output_dir, or pass "
                "--overwrite to delete that run's checkpoints and outputs"
            )
        env.barrier()  # every rank has looked before rank 0 deletes
        if existing and env.is_main:
            remove_previous_run(out_dir, root, existing)
        run = RunRecord(new_run_id())
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "run.json", {"run_id": run.run_id, "resumed_from": str(ckpt) if ckpt else None})
    env.barrier()
    return run
