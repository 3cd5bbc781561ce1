"""The training run behind one object: :class:`Trainer`, built from a config, runs the loop of
``patchdpo train`` / ``deepspeed patchdpo_fast/train.py`` and can be driven from Python.

Each optimizer step: B pairs per rank (reference image = winner, generated image = loser, or a preference pair's
winner and loser) share noise, timestep and conditioning; the policy predicts the noise for both, the frozen reference
too for the DPO losses, and the fused loss ops of :mod:`patchdpo_fast.ops` weight the error maps with the pairs'
quality maps. Checkpoints are atomic and pickle-free; a resumed run continues bit-exactly on the CPU.

Example::

    from patchdpo_fast.training import Trainer

    with Trainer.from_config("configs/tiny_cpu.yaml", ["train.max_steps=20"]) as trainer:
        result = trainer.fit()            # setup, the loop to train.max_steps, checkpoints, exports
    print(result.fixed_batch_loss_start, result.fixed_batch_loss_end, result.exports)

or step by step (each :meth:`Trainer.train_step` logs, checkpoints and samples when they are due)::

    trainer = Trainer(cfg).setup()
    while trainer.step < 5:
        trainer.train_step()
    trainer.save_checkpoint()
    trainer.close()
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchdpo_fast.config import TrainConfig, dump_config, load_config, resolve_deepspeed_config
from patchdpo_fast.training.batch import draw_pair_noise
from patchdpo_fast.training.build import build_engine, build_models, check_reference, reference_record
from patchdpo_fast.training.checkpoint import CheckpointDir, CheckpointError, prune_checkpoints
from patchdpo_fast.training.distributed import DistEnv, setup_distributed
from patchdpo_fast.training.ema import EMA_FILE, EMAWeights, build_ema
from patchdpo_fast.training.export import export_run
from patchdpo_fast.training.inputs import BatchStream, ModelInputs, build_data, collate
from patchdpo_fast.training.memory import log_startup_plan
from patchdpo_fast.training.metrics import MetricsLogger
from patchdpo_fast.training.rng import rng_state, set_rng_state
from patchdpo_fast.training.run_folder import RunRecord, check_before_loading, claim_output_dir, reading_checkpoint
from patchdpo_fast.training.state_io import atomic_write_json, load_state, save_state
from patchdpo_fast.training.step import fixed_batch_loss, forward_loss, window_means
from patchdpo_fast.training.trainable import TrainableSetup, setup_trainable
from patchdpo_fast.utils import write_safetensors

__all__ = ["TrainResult", "Trainer"]

logger = logging.getLogger("patchdpo_fast.train")


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    adapter_path: Path | None  #: the exported IP-Adapter file; None without an adapter (model.use_ip_adapter=false)
    final_step: int
    nan_skips: int
    last_checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)  #: the logged records, one per log step
    fixed_batch_loss_start: float | None = None  #: see :func:`~patchdpo_fast.training.step.fixed_batch_loss`
    fixed_batch_loss_end: float | None = None
    exports: dict[str, Path] = field(default_factory=dict)  #: every export: adapter, unet_lora, unet


class Trainer:
    """One training run of ``cfg``: models, data, engine, checkpoints, the loop and the exports.

    Args:
        cfg: the run's configuration (:func:`~patchdpo_fast.config.load_config`).
        resume: ``"latest"`` or a checkpoint path; overrides ``train.resume_from``. A resume checks the checkpoint's
            settings against ``cfg`` (:mod:`patchdpo_fast.training.resume`); ``latest`` skips corrupt checkpoints.
        overwrite: a fresh run (no checkpoint to resume) refuses an output folder that holds another run's
            checkpoints unless ``overwrite``, which deletes them first.
        local_rank: the launcher's ``--local_rank`` (DeepSpeed); the environment's ``LOCAL_RANK`` otherwise.

    Nothing is built by the constructor. :meth:`setup` joins the process group, claims the output folder, builds the
    models, the data and the engine and loads the checkpoint to resume; :meth:`train_step` runs one optimizer step;
    :meth:`fit` does both to ``train.max_steps`` and :meth:`finish` exports. Every rank of a multi-process job must
    make the same calls. :meth:`close` (or leaving the ``with`` block) leaves the process group.

    Raises (from :meth:`setup`):
        UserError: the output folder belongs to another run, the resume is refused, or the checkpoint is unusable.
    """

    def __init__(
        self, cfg: TrainConfig, *, resume: str | None = None, overwrite: bool = False, local_rank: int | None = None
    ) -> None:
        self.cfg = cfg
        self.resume = resume if resume is not None else cfg.train.resume_from
        self.overwrite = overwrite
        self.local_rank = local_rank
        self.env: DistEnv | None = None
        self.step = 0  #: optimizer steps done (the resumed step after a resume)
        self.nan_skips = 0  #: steps skipped for a non-finite loss
        self.consumed = 0  #: pairs this rank has drawn from the sampler
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self.fixed_batch_loss_end: float | None = None
        self._ready = False
        self._metrics_open = False

    @classmethod
    def from_config(cls, path: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> Trainer:
        """A trainer for the YAML config at ``path`` with ``KEY=VALUE`` overrides; ``kwargs`` as for the class."""
        return cls(load_config(path, list(overrides)), **kwargs)

    # -----------------------------------------------------------------------------------------------------------
    # Setup
    # -----------------------------------------------------------------------------------------------------------

    def setup(self) -> Trainer:
        """Build everything a step needs and load the checkpoint to resume (once; returns ``self``).

        A fresh run also writes the step-0 sample grid (when configured) and records the fixed-batch loss at step 0.
        """
        if self._ready:
            return self
        cfg, t_cfg, d_cfg = self.cfg, self.cfg.train, self.cfg.data
        self.env = env = setup_distributed(cfg.deepspeed.enabled, self.local_rank)
        self.output_dir = out_dir = Path(t_cfg.output_dir)
        torch.manual_seed(t_cfg.seed + env.rank)
        np.random.seed((t_cfg.seed + env.rank) % 2**32)
        random.seed(t_cfg.seed + env.rank)
        check_before_loading(cfg, env)
        self.run: RunRecord = claim_output_dir(cfg, env, self.resume, self.overwrite)
        run = self.run
        ckpt_path = run.checkpoint
        if env.is_main:
            dump_config(cfg, out_dir / "config.yaml")
            logger.info("output directory: %s (rank 0 of %d, device %s)", out_dir, env.world_size, env.device)

        self.models = models = build_models(cfg, env)
        # what trains (LoRA on, the frozen reference UNet copied from the initial weights) before any checkpoint loads
        self.trainable: TrainableSetup = setup_trainable(cfg, models)
        if env.is_main:  # counted from the real models' tensors; activations on a meta twin (nothing allocated)
            log_startup_plan(cfg, models, env.world_size, self.trainable.reference)
        self.reference = reference_record(cfg, models, self.trainable)  # before DeepSpeed casts or partitions
        if ckpt_path is not None:  # adapter weights go in before DeepSpeed partitions them
            with reading_checkpoint(ckpt_path):
                self.reference = self._load_checkpoint_weights(ckpt_path)
        self.dataset, cached = build_data(cfg, models, env)
        self.inputs = ModelInputs(cfg, models, env, cached)
        # the moving average starts from the (resumed) fp32 weights, before DeepSpeed casts them
        self.ema: EMAWeights | None = build_ema(cfg, models.ip_unet, resolve_deepspeed_config(cfg, env.world_size))
        self.engine = build_engine(cfg, models, env, self.trainable)

        from patchdpo_fast.data import ResumableSampler

        self.sampler = ResumableSampler(len(self.dataset), seed=d_cfg.shuffle_seed, rank=env.rank,
                                        world_size=env.world_size, drop_last=d_cfg.drop_last)  # fmt: skip
        if ckpt_path is not None:
            with reading_checkpoint(ckpt_path):
                trainer = self._load_checkpoint_state(ckpt_path)
            if trainer["world_size"] != env.world_size and cfg.deepspeed.enabled:
                raise CheckpointError(f"checkpoint {ckpt_path} was written by {trainer['world_size']} ranks; resuming "
                                      f"DeepSpeed ZeRO state needs the same number, got {env.world_size}")  # fmt: skip
            self.step, self.nan_skips = int(trainer["step"]), int(trainer["nan_skips"])
            self.consumed = int(trainer["consumed_per_rank"])
            self.sampler.load_state_dict(self.sampler.state_dict(consumed=self.consumed))
            run.resumed(trainer, self.engine, cfg)
            if env.is_main:
                logger.info("resumed from %s at step %d", ckpt_path, self.step)
        self.last_checkpoint = ckpt_path

        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=BatchStream(self.sampler, d_cfg.pairs_per_batch),
            num_workers=d_cfg.num_workers,
            collate_fn=collate,
            persistent_workers=d_cfg.num_workers > 0,
        )
        self._batches = iter(loader)
        self.metrics = MetricsLogger(out_dir, enabled=env.is_main, resume_step=self.step)
        self._metrics_open = self._ready = True

        self._maybe_sample(force=self.step == 0)
        if ckpt_path is None:  # a resumed run keeps the loss its checkpoints recorded at step 0
            run.fixed_batch_loss_start = self.fixed_batch_loss()
            if env.is_main:
                logger.info("fixed-batch loss at step %d: %.6f", self.step, run.fixed_batch_loss_start)
        self._window: list[dict[str, float]] = []
        self._t_window = time.perf_counter()
        return self

    def _require_setup(self) -> None:
        if not self._ready:
            self.setup()

    @property
    def fixed_batch_loss_start(self) -> float | None:
        """The fixed-batch loss at step 0 (recorded in the checkpoints, so a resumed run keeps it)."""
        return self.run.fixed_batch_loss_start if self._ready else None

    # -----------------------------------------------------------------------------------------------------------
    # Steps
    # -----------------------------------------------------------------------------------------------------------

    def fixed_batch_loss(self) -> float:
        """The configured loss on the dataset's first pairs with fixed noise and no dropout (policy only, no_grad)."""
        self._require_setup()
        return fixed_batch_loss(self.cfg, self.models, self.engine, self.inputs, self.dataset)

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step (``train.gradient_accumulation_steps`` micro-batches per rank).

        Then what is due at the new step: the metrics record (returned; None when the step logs nothing), the
        checkpoint (``train.checkpoint_every`` and the last step), the sample grid. A micro-batch with a non-finite
        loss on any rank skips the step on every rank (``train.nan_policy``, ``train.max_nan_skips``).
        """
        self._require_setup()
        cfg, env, engine = self.cfg, self.env, self.engine
        t_cfg, d_cfg = cfg.train, cfg.data
        assert env is not None
        num_timesteps = self.models.noise_scheduler.config.num_train_timesteps
        skipped_step = False
        for _ in range(t_cfg.gradient_accumulation_steps):
            batch = next(self._batches)
            self.consumed += len(batch["index"])
            x = self.inputs(batch, self.step)
            rnd = draw_pair_noise(t_cfg.seed, self.step, batch["index"], tuple(x["lat_ref"].shape[1:]), num_timesteps,
                                  d_cfg.drop_image, d_cfg.drop_text, d_cfg.drop_both)  # fmt: skip
            out = forward_loss(cfg, self.models, engine, self.inputs, x, rnd, train=True)
            loss_value = float(out.loss.detach())
            if env.any(not math.isfinite(loss_value)):
                if t_cfg.nan_policy == "error":
                    raise FloatingPointError(f"non-finite loss ({loss_value}) at step {self.step}; nan_policy=error")
                engine.skip_micro_step()
                skipped_step = True
                continue
            engine.backward(out.loss)
            if engine.step() and self.ema is not None:
                self.ema.update()
            self._window.append(
                {
                    "loss": loss_value,
                    "model_mse": float(out.model_mse.mean()),
                    **({"implicit_acc": float(out.implicit_acc)} if out.implicit_acc is not None else {}),
                    **({"log_ratio": float(out.log_ratio.mean())} if out.log_ratio is not None else {}),
                }
            )
        if skipped_step:
            self.nan_skips += 1
            if env.is_main:
                logger.warning("step %d: non-finite loss, step skipped (%d skipped so far)", self.step, self.nan_skips)
            if self.nan_skips > t_cfg.max_nan_skips:
                raise FloatingPointError(
                    f"{self.nan_skips} steps had a non-finite loss (train.max_nan_skips={t_cfg.max_nan_skips})"
                )
        self.step += 1
        step = self.step

        record = None
        if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
            record = self._log_window()
        if step % t_cfg.checkpoint_every == 0 or step == t_cfg.max_steps:
            self.last_checkpoint = self.save_checkpoint()
        self._maybe_sample(force=step == t_cfg.max_steps)
        return record

    def _log_window(self) -> dict[str, Any]:
        """The record of the steps since the last log: window means over micro-steps and ranks, lr, throughput."""
        t_cfg, env, step = self.cfg.train, self.env, self.step
        assert env is not None
        elapsed = time.perf_counter() - self._t_window
        record: dict[str, Any] = window_means(self._window, env)
        steps_in_window = t_cfg.log_every if step % t_cfg.log_every == 0 else step % t_cfg.log_every
        pairs_per_step = self.cfg.data.pairs_per_batch * t_cfg.gradient_accumulation_steps * env.world_size
        record.update(
            lr=self.engine.lr(),
            grad_norm=self.engine.last_grad_norm,
            nan_skips=self.nan_skips,
            steps_per_s=steps_in_window / elapsed if elapsed > 0 else None,
            pairs_per_s=steps_in_window * pairs_per_step / elapsed if elapsed > 0 else None,
            epoch=self.consumed // max(1, len(self.sampler)),
        )
        self.history.append({"step": step, **record})
        self.metrics.log(step, record)
        self._window, self._t_window = [], time.perf_counter()
        return record

    def fit(self) -> TrainResult:
        """Set up (if not yet), train to ``train.max_steps`` with a progress bar on rank 0, then :meth:`finish`."""
        self._require_setup()
        env, max_steps = self.env, self.cfg.train.max_steps
        assert env is not None
        progress = None
        if env.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=max_steps, initial=self.step, desc="patchdpo", dynamic_ncols=True, file=sys.stderr)
        try:
            while self.step < max_steps:
                record = self.train_step()
                if progress is not None:
                    if record is not None:
                        post = {"loss": f"{record.get('loss', float('nan')):.4f}"}
                        if "implicit_acc" in record:
                            post["acc"] = f"{record['implicit_acc']:.2f}"
                        if record["steps_per_s"]:
                            post["it/s"] = f"{record['steps_per_s']:.2f}"
                        progress.set_postfix(post)
                    progress.update(1)
        finally:
            if progress is not None:
                progress.close()
        return self.finish()

    def finish(self) -> TrainResult:
        """End the run at the current step: the fixed-batch loss again, the exports (the EMA weights when
        ``optim.use_ema``) and ``summary.json``. Call it once, after the last :meth:`train_step`."""
        self._require_setup()
        env, out_dir = self.env, self.output_dir
        assert env is not None
        self.fixed_batch_loss_end = eval_end = self.fixed_batch_loss()
        eval_start = self.run.fixed_batch_loss_start
        if env.is_main:
            logger.info("fixed-batch loss at step %d: %.6f (at step 0: %s)", self.step, eval_end, eval_start)
        self._close_metrics()
        exports: dict[str, Path] = {}
        # the fp32 masters (DeepSpeed bf16 / fp16 keeps them in the optimizer), gathered under ZeRO-3
        with self.engine.gathered(self._saved_parameters()), self.engine.master_weights():
            if env.is_main:
                exports = self.export(out_dir)
                adapter = exports.get("adapter")
                atomic_write_json(
                    out_dir / "summary.json",
                    {"final_step": self.step, "nan_skips": self.nan_skips, "adapter": str(adapter) if adapter else None,
                     "exports": {k: str(v) for k, v in exports.items()}, "trainable": self.trainable.mode.name,
                     "fixed_batch_loss_start": eval_start, "fixed_batch_loss_end": eval_end,
                     "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                     "world_size": env.world_size},
                )  # fmt: skip
        env.barrier()
        return TrainResult(out_dir, exports.get("adapter"), self.step, self.nan_skips, self.last_checkpoint,
                           self.history, eval_start, eval_end, exports)  # fmt: skip

    def export(self, out_dir: str | Path | None = None) -> dict[str, Path]:
        """Write the mode's exports to ``out_dir`` (default ``train.output_dir``): the IP-Adapter file, the UNet LoRA
        (diffusers ``load_lora_weights``) or the full ``unet/`` folder, in ``train.export_dtype``; the EMA weights
        when ``optim.use_ema``. Rank 0 only, inside ``engine.gathered()`` and ``engine.master_weights()`` under
        DeepSpeed (as :meth:`finish` calls it: every rank enters those, they are collective).
        """
        self._require_setup()
        target = Path(out_dir) if out_dir is not None else self.output_dir
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():  # exports hold the average
            return export_run(self.cfg, self.models, self.trainable.mode, target)

    def close(self) -> None:
        """Close the metrics logs and leave the process group (if this trainer joined one); the trainer cannot step
        afterwards. A run closed before :meth:`finish` continues from its last checkpoint with ``resume``."""
        self._close_metrics()
        if self.env is not None:
            self.env.shutdown()
        self._ready = False

    def _close_metrics(self) -> None:
        if self._metrics_open:
            self.metrics.close()
            self._metrics_open = False

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _maybe_sample(self, force: bool) -> None:
        """Write ``samples/step_N.png`` (see :class:`~patchdpo_fast.config.SamplesConfig`) when it is due."""
        s_cfg, env, step = self.cfg.samples, self.env, self.step
        assert env is not None
        if s_cfg.references is None or not (force or (s_cfg.every and step % s_cfg.every == 0)):
            return
        from patchdpo_fast.training.samples import write_sample_grid

        with self.engine.gathered():
            if env.is_main:
                path = self.output_dir / "samples" / f"step_{step:08d}.png"
                write_sample_grid(s_cfg, self.models, self.cfg.data.resolution, path)
                logger.info("samples at step %d: %s", step, path)
        env.barrier()

    # -----------------------------------------------------------------------------------------------------------
    # Checkpoints
    # -----------------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` atomically (every rank takes part) and prune old ones; returns its path.

        It holds the policy adapter (the DPO reference is recorded by its hash, never stored), the UNet or its LoRA
        in the UNet modes, the EMA weights, the engine's optimizer / scheduler / scaler state (per rank under
        DeepSpeed), every RNG state, the step counters and the config.
        """
        self._require_setup()
        cfg, env, engine, run = self.cfg, self.env, self.engine, self.run
        assert env is not None
        root = self.output_dir / "checkpoints"
        ckpt = CheckpointDir(root, self.step, run.run_id)
        if env.is_main:
            ckpt.begin()
        env.barrier()
        global_state, rank_state = engine.state()  # collective for DeepSpeed
        with engine.gathered(self._saved_parameters()):  # under ZeRO-3 only what the files hold
            adapter = self.models.adapter_state_dict() if env.is_main else None
            # the UNet side of the mode (unet.safetensors, unet_lora.safetensors); the reference is never stored
            unet_files = self.trainable.checkpoint_tensors(self.models.ip_unet) if env.is_main else {}
        if rank_state is not None:
            save_state(rank_state, ckpt.tmp / f"engine_rank{env.rank}")
            ckpt.record_digests([f"engine_rank{env.rank}.json", f"engine_rank{env.rank}.safetensors"],
                                f"rank{env.rank}")  # fmt: skip
        if env.is_main:
            # the policy only, straight from the weights (no copy); the reference adapter is recorded, not stored
            meta = {"reference": json.dumps(self.reference)} if self.reference is not None else None
            write_safetensors(adapter, ckpt.tmp / "adapter.safetensors", metadata=meta)
            for name, tensors in unet_files.items():
                write_safetensors(tensors, ckpt.tmp / name)
            if self.ema is not None:
                write_safetensors(self.ema.state_dict(), ckpt.tmp / EMA_FILE)
            save_state(
                {
                    "engine": global_state,
                    "rng": rng_state(),
                    "step": self.step,
                    "consumed_per_rank": self.consumed,
                    "nan_skips": self.nan_skips,
                    "world_size": env.world_size,
                    **run.trainer_fields(),
                },
                ckpt.tmp / "trainer",
            )
            dump_config(cfg, ckpt.tmp / "config.yaml")
        env.barrier()
        if env.is_main:
            ckpt.commit()
            for gone in prune_checkpoints(root, cfg.train.keep_checkpoints, run.run_id):
                logger.debug("pruned checkpoint %s", gone)
        env.barrier()
        return ckpt.final

    def _saved_parameters(self) -> list[torch.nn.Parameter]:
        """What checkpoints and exports read (the adapter, the LoRA, the whole UNet when it trains)."""
        return self.models.ip_unet.saved_parameters(whole_unet=self.trainable.mode.unet == "full")

    def _load_checkpoint_state(self, path: Path) -> dict[str, Any]:
        """The engine, EMA and RNG state of checkpoint ``path``; returns its trainer record (step counters)."""
        assert self.env is not None
        trainer = load_state(path / "trainer")
        if self.ema is not None:
            from safetensors.torch import load_file

            if not (path / EMA_FILE).is_file():
                raise FileNotFoundError(f"checkpoint {path} has no {EMA_FILE}, but optim.use_ema is true")
            self.ema.load_state_dict(load_file(str(path / EMA_FILE)))
        rank_file = path / f"engine_rank{self.env.rank}"
        rank_state = load_state(rank_file) if rank_file.with_suffix(".json").exists() else None
        self.engine.load_state(trainer["engine"], rank_state)
        set_rng_state(trainer["rng"])
        return trainer

    def _load_checkpoint_weights(self, path: Path) -> dict[str, Any] | None:
        """Load a checkpoint's policy adapter (and the UNet side of the trainable mode: the UNet or its LoRA) after
        checking its reference record; returns the run's reference record.

        Checkpoints written before the reference was left out hold its weights: they are loaded into the reference.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        models, reference = self.models, self.reference
        file = path / "adapter.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no adapter.safetensors")
        with safe_open(str(file), framework="pt") as handle:
            stored = json.loads((handle.metadata() or {}).get("reference", "null"))
        check_reference(path, stored, reference)
        self.trainable.load_checkpoint(path, models.ip_unet)
        stored_reference = models.load_adapter_state_dict(load_file(str(file)))
        if stored_reference and reference is not None and reference["kind"] == "initial adapter":
            # an older checkpoint that stored the reference adapter: it was loaded into the reference
            return {**reference, "sha256": models.ip_unet.reference_fingerprint()}
        return reference
