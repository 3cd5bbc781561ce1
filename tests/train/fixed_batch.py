"""The trainer's own pieces on one fixed batch, for tests that step a tiny model a few times without ``train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from patchdpo_fast.config import TrainConfig, load_config
from patchdpo_fast.data import build_pair_dataset
from patchdpo_fast.training.batch import draw_pair_noise
from patchdpo_fast.training.build import build_engine, build_models
from patchdpo_fast.training.distributed import DistEnv
from patchdpo_fast.training.inputs import ModelInputs, collate
from patchdpo_fast.training.step import forward_loss
from patchdpo_fast.training.trainable import setup_trainable

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"
ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def fixed_batch_cfg(*overrides: str) -> TrainConfig:
    """configs/tiny_cpu.yaml with 2 pairs in one uncached batch, no warmup, no conditioning dropout, LoRA rank 4."""
    base = ["data.procedural.num_pairs=2", "data.pairs_per_batch=2", "cache.enabled=false", "optim.warmup_steps=0",
            "data.drop_image=0", "data.drop_text=0", "data.drop_both=0", "model.lora.rank=4"]  # fmt: skip
    return load_config(TINY, [*base, *overrides], check_paths=False)


class FixedBatch:
    """The trainer's models, trainable setup and engine for ``cfg``, with one fixed batch (noise, timesteps)."""

    def __init__(self, cfg: TrainConfig) -> None:
        torch.manual_seed(0)
        self.cfg = cfg
        self.models = build_models(cfg, ENV)
        self.setup = setup_trainable(cfg, self.models)
        self.engine = build_engine(cfg, self.models, ENV, self.setup)
        self.inputs = ModelInputs(cfg, self.models, ENV, None)
        dataset = build_pair_dataset(cfg.data, needs_quality=True)
        self.x = self.inputs(collate([dataset[0], dataset[1]]), 0)
        self.rnd = draw_pair_noise(0, 0, [0, 1], tuple(self.x["lat_ref"].shape[1:]), 1000, 0.0, 0.0, 0.0)

    def loss(self, train: bool = False) -> Any:
        """The forward loss on the fixed batch (``train=False``: the policy under no_grad, as the fixed-batch loss)."""
        return forward_loss(self.cfg, self.models, self.engine, self.inputs, self.x, self.rnd, train=train)

    def step(self, n: int = 1) -> None:
        """``n`` optimizer steps on the fixed batch."""
        for _ in range(n):
            out = self.loss(train=True)
            self.engine.backward(out.loss)
            self.engine.step()
