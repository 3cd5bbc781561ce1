"""The light core: the loss ops need torch, triton, numpy and safetensors only; the training stack is the [train] extra.

1. In this environment, a fresh interpreter that imports ``patchdpo_fast.ops`` and runs a fused loss forward and
   backward loads none of the training stack.
2. A wheel built from this checkout installs, with ``pip --no-index`` (nothing is downloaded: pip must find every
   requirement already installed), into a new virtual environment that holds only the core packages and their own
   dependencies (linked from this environment, which is how the test stays offline and fast), and the loss ops run
   there; the training stack is not importable in it and ``patchdpo train`` says which extra to install.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
CORE = ("torch", "triton", "numpy", "safetensors")
TRAINING_STACK = ("diffusers", "transformers", "accelerate", "deepspeed", "bitsandbytes", "pydantic", "yaml", "PIL")

CHECK = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch
    import patchdpo_fast.ops as ops
    from patchdpo_fast.ops.dispatch import triton_status

    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=gen).requires_grad_(True)
    target = torch.randn(2, 4, 8, 8, generator=gen)
    weight = torch.rand(2, 4, 4, generator=gen)
    fused = ops.patch_weighted_mse(pred, target, weight, backend="triton")
    fused.loss.backward()
    ref = ops.patch_weighted_mse(pred.detach(), target, weight, backend="torch")
    heavy = HEAVY
    print(json.dumps({
        "loss_diff": abs(fused.loss.item() - ref.loss.item()),
        "grad_finite": bool(torch.isfinite(pred.grad).all()),
        "triton": triton_status()[:2],
        "loaded": sorted(m for m in heavy if m in sys.modules),
        "installed": sorted(m for m in heavy if importlib.util.find_spec(m) is not None),
        "package": ops.__file__,
    }))
    """
).replace("HEAVY", repr(TRAINING_STACK))


def _run_check(python: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(TRITON_INTERPRET="1", PYTHONNOUSERSITE="1")
    proc = subprocess.run([python, "-c", CHECK], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ops_import_no_training_stack(tmp_path):
    result = _run_check(sys.executable, tmp_path)
    assert result["loaded"] == []
    assert result["triton"] == [True, True]
    assert result["loss_diff"] < 1e-5 and result["grad_finite"]


def _closure(names: tuple[str, ...]) -> list[md.Distribution]:
    """The installed distributions ``names`` need (their requirements, recursively; extras and markers honoured)."""
    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        dist = md.distribution(name)
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _link_core(site: Path) -> list[str]:
    """Make the core packages (and only them) importable in ``site`` by linking their installed files."""
    linked = []
    for dist in _closure(CORE):
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in sorted(tops):
            src = Path(str(dist.locate_file(top)))
            if top in ("..", "__pycache__") or not src.exists() or (site / top).exists():
                continue
            (site / top).symlink_to(src)
            linked.append(top)
    return linked


@pytest.mark.slow
def test_wheel_installs_with_only_the_core(tmp_path):
    # a clean copy of the checkout, so that building leaves nothing behind in it
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".benchmarks",
        ".whl", "results",
    ))  # fmt: skip
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    (wheel,) = wheels.glob("patchdpo_fast-*.whl")
    # every module of the checkout is in the wheel (a folder without __init__.py is skipped by find_packages)
    with zipfile.ZipFile(wheel) as zf:
        packed = set(zf.namelist())
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "patchdpo_fast").rglob("*.py")}
    sources |= {
        "patchdpo_fast/kernels/" + p.relative_to(REPO / "kernels").as_posix() for p in (REPO / "kernels").rglob("*.py")
    }
    assert not sources - packed, sorted(sources - packed)

    env_dir = tmp_path / "core_env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    linked = _link_core(Path(purelib))
    assert {"torch", "triton", "numpy", "safetensors"} <= set(linked)
    assert not {"diffusers", "transformers", "pydantic"} & set(linked)

    # --no-index: every requirement of the wheel must already be satisfied by the core alone
    install = subprocess.run(
        [*pip, "--python", str(python), "install", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-4000:]
    requires = md.PathDistribution(next(Path(purelib).glob("patchdpo_fast-*.dist-info"))).requires or []
    core_requires = sorted(Requirement(r).name for r in requires if "extra ==" not in r)
    assert core_requires == sorted(CORE)

    result = _run_check(str(python), tmp_path)
    assert result["installed"] == [] and result["loaded"] == []
    assert result["package"].startswith(purelib)
    assert result["triton"] == [True, True]  # patchdpo_fast.kernels came with the wheel
    assert result["loss_diff"] < 1e-5 and result["grad_finite"]

    cli = subprocess.run(
        [str(env_dir / "bin" / "patchdpo"), "train", "--help"], capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )  # fmt: skip
    assert cli.returncode == 2
    assert "pip install 'patchdpo_fast[train]'" in cli.stderr
    assert sysconfig.get_paths()["purelib"] != purelib


def test_every_package_folder_has_an_init():
    """setup.py's find_packages skips a folder without ``__init__.py``: an installed wheel would lack its modules
    (``patchdpo_fast.training`` was missing from wheels until the first GPU session found it)."""
    missing = sorted(
        d.relative_to(REPO).as_posix()
        for d in (REPO / "patchdpo_fast").rglob("*")
        if d.is_dir() and any(d.glob("*.py")) and not (d / "__init__.py").exists()
    )
    assert not missing
