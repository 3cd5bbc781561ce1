"""Fixtures of the DreamBench tests: the mini reference set, its protocol, tiny metric models and a tiny pipeline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from patchdpo_fast.eval.dreambench import DreamBenchProtocol, parse_prompts_file, reference_images

#: Two DreamBench subjects (an object and a live subject), 3 photos each, plus the protocol and licenses files.
MINI = Path(__file__).resolve().parents[1] / "assets" / "dreambench_mini"
SUBJECTS = ("backpack", "dog")


@pytest.fixture(scope="session")
def mini() -> Path:
    return MINI


@pytest.fixture(scope="session")
def protocol() -> DreamBenchProtocol:
    return parse_prompts_file(MINI / "prompts_and_classes.txt")


@pytest.fixture(scope="session")
def eval_models():
    from patchdpo_fast.eval.metrics import build_eval_models

    return build_eval_models(tiny=True, seed=0, device="cpu")


@pytest.fixture(scope="session")
def tiny_pipe():
    from patchdpo_fast.generation import build_pipeline
    from patchdpo_fast.models import build_models

    return build_pipeline(build_models(tiny=True, seed=0), scheduler="euler")


def _write_layout(root: Path, protocol: DreamBenchProtocol, images: dict[str, list[Path]], limit: int = 2) -> Path:
    """Write ``root/<subject>/<prompt>.png`` for the first ``limit`` prompts.

    Prompt ``j`` of a subject is a PNG copy of ``images[subject][j % n]``.
    """
    from PIL import Image

    for subject, sources in images.items():
        for j, item in enumerate(protocol.items([subject], limit)):
            path = root / subject / item.file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(sources[j % len(sources)]) as img:
                img.convert("RGB").save(path)
    return root


def _photos(subject: str) -> list[Path]:
    return reference_images(MINI, subject)


@pytest.fixture
def write_layout():
    """``write_layout(root, protocol, {subject: [source images]}, limit=2)``: a generated folder of image copies."""
    return _write_layout


@pytest.fixture
def photos():
    """``photos(subject)``: the subject's mini reference photos, sorted."""
    return _photos


@pytest.fixture
def references_copy(tmp_path: Path) -> Path:
    """A writable copy of the mini reference set."""
    return Path(shutil.copytree(MINI, tmp_path / "references"))
