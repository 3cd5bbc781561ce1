"""DeepSpeed ZeRO-2 on 2 CPU ranks (gloo) against 1 rank with the same global batch, and its exact resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from ds_launch import REPO, run_trainer
from safetensors.torch import load_file

TINY = REPO / "configs" / "tiny_cpu.yaml"
ZERO2 = REPO / "configs" / "deepspeed" / "zero2.json"

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow


def _run(tmp_path: Path, name: str, ranks: int, pairs_per_rank: int, *extra: str, ds_json: Path = ZERO2) -> Path:
    out = tmp_path / name
    overrides = [
        f"deepspeed.config={ds_json}",
        f"train.output_dir={out}",
        f"cache.dir={tmp_path / 'cache'}",
        "cache.on_stale=rebuild",
        "data.procedural.num_pairs=8",
        f"data.pairs_per_batch={pairs_per_rank}",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=null",
        "train.log_every=2",
        "loss.type=patch_dpo",
        *extra,
    ]
    run_trainer(TINY, overrides, ranks, tmp_path)
    return out


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter.safetensors"))


def test_zero2_two_ranks_match_one_rank_and_resume_exactly(tmp_path):
    two = _run(tmp_path, "two_ranks", ranks=2, pairs_per_rank=2)
    one = _run(tmp_path, "one_rank", ranks=1, pairs_per_rank=4)
    a = _adapter(two / "checkpoints" / "step_00000004")
    b = _adapter(one / "checkpoints" / "step_00000004")
    start = _adapter(two / "checkpoints" / "step_00000002")
    moved = 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
        moved += int(not torch.equal(a[key], start[key]))
    assert moved > 0  # training changed the adapter between the checkpoints

    # resume the 2-rank run from its step-2 checkpoint: ZeRO partitions and optimizer state restore exactly
    shutil.copytree(two, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000002" / "engine_rank1.safetensors").exists()
    resumed = _run(tmp_path, "resumed", 2, 2, "train.resume_from=latest")
    c = _adapter(resumed / "checkpoints" / "step_00000004")
    for key in a:
        assert torch.equal(a[key], c[key]), key


def test_zero3_resume_is_exact(tmp_path):
    """ZeRO-3 partitions the frozen UNet too; its fp32 partitions, optimizer moments and LR restore exactly."""
    zero3 = REPO / "configs" / "deepspeed" / "zero3.json"
    opts = ("train.max_steps=2", "train.checkpoint_every=1")
    straight = _run(tmp_path, "straight", 2, 2, *opts, ds_json=zero3)
    shutil.copytree(straight, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000002")
    resumed = _run(tmp_path, "resumed", 2, 2, *opts, "train.resume_from=latest", ds_json=zero3)
    for name in ("adapter.safetensors", "engine_rank0.safetensors", "engine_rank1.safetensors"):
        a = load_file(str(straight / "checkpoints" / "step_00000002" / name))
        b = load_file(str(resumed / "checkpoints" / "step_00000002" / name))
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key}"
    exported = load_file(str(resumed / "ip_adapter.safetensors"))  # gathered from the ZeRO-3 partitions
    assert exported and all(t.numel() > 0 for t in exported.values())


@pytest.mark.parametrize(("stage", "ranks"), [(2, 1), (3, 2)])
def test_bf16_exports_hold_the_fp32_master_weights(tmp_path, stage, ranks):
    """Under DeepSpeed bf16 the module holds bf16 working copies; an fp32 export is written from the fp32 masters."""
    ds_json = REPO / "configs" / "deepspeed" / f"zero{stage}.json"
    out = _run(tmp_path, "bf16", ranks, 2, "train.mixed_precision=bf16", "train.export_dtype=fp32",
               "train.max_steps=2", "optim.lr=1e-3", ds_json=ds_json)  # fmt: skip
    exported = load_file(str(out / "ip_adapter.safetensors"))
    working = _adapter(out / "checkpoints" / "step_00000002")  # the checkpoint's copy: the module's bf16 weights
    assert {t.dtype for t in working.values()} == {torch.bfloat16}
    assert {t.dtype for t in exported.values()} == {torch.float32}
    finer = 0
    for key, value in exported.items():
        finer += int((value.to(torch.bfloat16).float() != value).sum())  # not a bf16 value widened to fp32
        # the master rounds to the working copy (DeepSpeed casts the masters to bf16 after each step)
        rounded = value.to(torch.bfloat16)
        assert any(w.shape == rounded.shape and torch.equal(w, rounded) for w in working.values()), key
    assert finer > 0
