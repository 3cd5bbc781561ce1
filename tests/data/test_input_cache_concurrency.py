"""Parallel jobs sharing one input cache folder (issue 9, item 7): no crash, and byte-identical builds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from patchdpo_fast.data import CachedPairDataset, verify_input_cache

BUILDER = textwrap.dedent(
    """
    import sys, time
    import torch
    import torch.nn.functional as F
    from patchdpo_fast.data import CachedPairDataset, ProceduralPairDataset, build_input_cache

    def slow(fn):
        def call(*args):
            time.sleep(0.02)  # keep the builders overlapping
            return fn(*args)
        return call

    encoders = {
        "encode_images": slow(lambda p: F.avg_pool2d(p, 8).repeat(1, 2, 1, 1)[:, :4]),
        "encode_prompts": slow(lambda prompts: (torch.ones(len(prompts), 2, 3) * len(prompts[0]), None)),
        "encode_reference": slow(lambda p: p.mean(dim=(2, 3))[:, None, :]),
    }
    dataset = ProceduralPairDataset(12, resolution=64, seed=0)
    build_input_cache(dataset, sys.argv[1], shard_size=2, batch_size=1, dtype=torch.float32, progress=False,
                      **encoders)
    cached = CachedPairDataset(sys.argv[1])
    print(sum(float(cached[i]["latents_ref"].sum()) for i in range(len(cached))))
    """
)


def _start(cache_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(cache_dir)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_three_builders_sharing_a_cache_dir(tmp_path):
    procs = [_start(tmp_path / "cache") for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-2000:]
    assert len({out.strip() for out, _ in results}) == 1  # every job read the same cache
    assert verify_input_cache(tmp_path / "cache") == []
    assert not list((tmp_path / "cache").glob(".tmp-*"))
    assert len(CachedPairDataset(tmp_path / "cache")) == 12


def test_identical_builds_are_byte_identical(tmp_path):
    procs = [_start(tmp_path / name) for name in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if not p.name.startswith("."))
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir() if not p.name.startswith("."))
    assert len([f for f in files if f.startswith("shard_")]) == 6
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
