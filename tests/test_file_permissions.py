"""Written files get the usual permissions (0666 minus the umask), not mkstemp's / safetensors' 0600 (issue 9, 10)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from patchdpo_fast.config import load_config

REPO = Path(__file__).resolve().parents[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def expected() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_training_outputs_and_checkpoints(tmp_path):
    from patchdpo_fast.train import train

    sets = [f"train.output_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}", "train.max_steps=1",
            "data.procedural.num_pairs=2", "train.checkpoint_every=1"]  # fmt: skip
    result = train(load_config(REPO / "configs" / "tiny_cpu.yaml", sets))
    files = [result.adapter_path, result.output_dir / "config.yaml", result.output_dir / "summary.json",
             result.output_dir / "run.json", *sorted(p for p in result.last_checkpoint.iterdir())]  # fmt: skip
    assert {p.name for p in files} >= {"ip_adapter.safetensors", "adapter.safetensors", "trainer.safetensors",
                                       "trainer.json", "checkpoint.json", "config.yaml"}  # fmt: skip
    assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(expected()) for p in files}
    shards = list((tmp_path / "cache").glob("*.safetensors"))
    assert shards and all(mode(p) == expected() for p in shards)


def test_quality_maps_estimators_and_adapter_files(tmp_path):
    from patchdpo_fast.data import write_quality_map
    from patchdpo_fast.models.ip_adapter import write_ip_adapter_file
    from patchdpo_fast.quality import PatchQualityEstimator

    write_quality_map(tmp_path / "q.safetensors", torch.rand(4, 4))
    write_ip_adapter_file(tmp_path / "a.safetensors", {"w": torch.zeros(2)}, {"1.to_k_ip.weight": torch.zeros(2, 2)})
    folder = PatchQualityEstimator.tiny(seed=0).save_pretrained(tmp_path / "estimator")
    files = [
        tmp_path / "q.safetensors",
        tmp_path / "a.safetensors",
        *sorted(p for p in folder.rglob("*") if p.is_file()),
    ]
    assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(expected()) for p in files}
