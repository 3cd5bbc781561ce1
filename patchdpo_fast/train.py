"""The training launcher of ``patchdpo train``, ``python -m patchdpo_fast.train``, ``deepspeed patchdpo_fast/train.py``.

Launch::

    python -m patchdpo_fast.train --config configs/tiny_cpu.yaml              # single process
    patchdpo train --config configs/tiny_cpu.yaml --set train.max_steps=10   # same, through the CLI
    torchrun --nproc_per_node 8 -m patchdpo_fast.train --config ...          # plain DDP
    deepspeed --num_gpus 8 patchdpo_fast/train.py --config configs/sdxl_ipadapter_plus.yaml   # DeepSpeed ZeRO

The run itself is :class:`patchdpo_fast.training.Trainer` (models, data, engine, checkpoints, the loop, exports); this
module parses the command line and hands the config to it. From Python, ``train(cfg)`` or the trainer directly::

    from patchdpo_fast.training import Trainer
    result = Trainer.from_config("configs/tiny_cpu.yaml", ["train.max_steps=20"]).fit()
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from patchdpo_fast.config import TrainConfig, load_config
from patchdpo_fast.training.export import EXPORT_DTYPES
from patchdpo_fast.training.run_folder import RunFolderError
from patchdpo_fast.training.trainer import Trainer, TrainResult

__all__ = ["RunFolderError", "TrainResult", "Trainer", "main", "train"]


def train(
    cfg: TrainConfig, *, resume: str | None = None, local_rank: int | None = None, overwrite: bool = False
) -> TrainResult:
    """Train with ``cfg`` to ``train.max_steps``: ``Trainer(cfg, ...).fit()``, leaving the process group after.

    ``resume`` ('latest' or a checkpoint path) overrides ``train.resume_from``. A fresh run (no checkpoint to
    resume) refuses an output folder that holds another run's checkpoints unless ``overwrite``, which deletes them
    first. A resume checks the checkpoint's settings against ``cfg`` (:mod:`patchdpo_fast.training.resume`).

    Raises:
        UserError: the output folder belongs to another run, the resume is refused, or the checkpoint is unusable.
    """
    with Trainer(cfg, resume=resume, local_rank=local_rank, overwrite=overwrite) as trainer:
        return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    """``patchdpo train`` / ``python -m patchdpo_fast.train`` / ``deepspeed patchdpo_fast/train.py``.

    User errors (config, data, paths, a refused resume) propagate; :func:`patchdpo_fast.cli.run_command` prints
    them as one line with exit status 2.
    """
    parser = argparse.ArgumentParser(
        prog="patchdpo train",
        description="PatchDPO / Diffusion-DPO training of the IP-Adapter, a UNet LoRA or the UNet (model.trainable).",
    )
    parser.add_argument("--config", default="configs/tiny_cpu.yaml", help="YAML config (default: the tiny CPU demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=100 (repeatable)")  # fmt: skip
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from the newest checkpoint in train.output_dir or from a given path")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir holding another run (deletes its checkpoints)")  # fmt: skip
    parser.add_argument("--export-dtype", choices=sorted(EXPORT_DTYPES), default=None,
                        help="dtype of the exported ip_adapter.safetensors and UNet LoRA (same as --set "
                             "train.export_dtype=...; default fp16 like the official files, fp32 keeps the exact "
                             "master weights)")  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.export_dtype is not None:
        overrides.append(f"train.export_dtype={args.export_dtype}")
    cfg = load_config(args.config, overrides)  # a ConfigError names the key (reported by cli.run_command)
    result = train(cfg, resume=args.resume, local_rank=args.local_rank, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        adapter = str(result.adapter_path) if result.adapter_path else None
        print(json.dumps({"output_dir": str(result.output_dir), "adapter": adapter,
                          "final_step": result.final_step, "nan_skips": result.nan_skips,
                          "exports": {k: str(v) for k, v in result.exports.items()},
                          "last_checkpoint": str(result.last_checkpoint)}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("train", main))
