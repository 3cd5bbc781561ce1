"""Every user error is one line on stderr naming the thing, exit status 2; ``--debug`` shows the traceback.

One shared mechanism (:func:`patchdpo_fast.cli.run_command`) serves every command (issue 9, item 8).
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

import pytest

from patchdpo_fast.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
MINI = REPO / "tests" / "assets" / "dreambench_mini"


def one_line_error(capsys, command: str) -> str:
    """The error line (other stderr lines are logs and library warnings); no traceback anywhere."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert lines and lines[-1].startswith(f"patchdpo {command}: "), err  # the error ends stderr, on its own line
    assert err.endswith(lines[-1] + "\n") and f"\n{lines[-1]}" in "\n" + err, err
    return lines[-1]


def train_args(tmp_path: Path, *sets: str) -> list[str]:
    base = [f"train.output_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}", "train.max_steps=2",
            "data.procedural.num_pairs=2", "train.checkpoint_every=2"]  # fmt: skip
    return ["train", "--config", str(TINY), *(a for s in [*base, *sets] for a in ("--set", s))]


# -- train -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["loss.beta=.inf", "optim.lr=.inf", "optim.lr=.nan", "loss.beta=1e300"])
def test_non_finite_config_values_are_refused(tmp_path, capsys, setting):
    assert cli(train_args(tmp_path, setting)) == 2
    assert setting.split("=")[0] in one_line_error(capsys, "train")


def test_manifest_error_is_one_line(tmp_path, capsys):
    from patchdpo_fast.data import write_procedural_manifest

    manifest = write_procedural_manifest(tmp_path / "pairs", num_pairs=2, resolution=64, seed=0)
    (tmp_path / "pairs" / "references" / "00001.png").unlink()
    sets = ("data.source=manifest", f"data.manifest_path={manifest}")
    assert cli(train_args(tmp_path, *sets)) == 2
    err = one_line_error(capsys, "train")
    assert "1 bad record(s)" in err and "missing file: reference 'references/00001.png'" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_triton_backend_without_a_device_for_it(tmp_path, capsys, monkeypatch):
    import patchdpo_fast.ops.dispatch as dispatch

    monkeypatch.setattr(dispatch, "triton_status", lambda: (True, False, ""))  # no interpreter, no CUDA
    assert cli(train_args(tmp_path, "loss.backend=triton")) == 2
    err = one_line_error(capsys, "train")
    assert "loss.backend=triton cannot run here" in err and "loss.backend=auto" in err


def test_xformers_without_fallback(tmp_path, capsys):
    from patchdpo_fast.models import xformers_status

    if xformers_status()[0]:
        pytest.skip("xformers works here")
    assert cli(train_args(tmp_path, "model.attention_backend=xformers", "model.xformers_fallback=false")) == 2
    assert "xformers" in one_line_error(capsys, "train")


def test_output_dir_that_is_a_file_and_resume_of_a_non_checkpoint(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert cli(train_args(tmp_path)) == 2
    assert "train.output_dir" in one_line_error(capsys, "train")
    (tmp_path / "run").unlink()
    assert cli([*train_args(tmp_path), "--resume", str(TINY)]) == 2
    assert f"--resume {TINY}" in one_line_error(capsys, "train")


def test_disk_full_and_nan_abort(tmp_path, capsys, monkeypatch):
    import patchdpo_fast.training.step as step_mod
    import patchdpo_fast.training.trainer as trainer_mod

    def full(obj, stem):
        raise OSError(errno.ENOSPC, "No space left on device", str(stem))

    monkeypatch.setattr(trainer_mod, "save_state", full)
    assert cli(train_args(tmp_path)) == 2
    err = one_line_error(capsys, "train")
    assert "No space left on device" in err and "trainer" in err
    monkeypatch.undo()

    real = step_mod.compute_loss

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        return type(out)(**{**out.__dict__, "loss": out.loss * float("nan")})

    monkeypatch.setattr(step_mod, "compute_loss", nan_loss)
    assert cli(train_args(tmp_path, "train.nan_policy=error", "train.output_dir=" + str(tmp_path / "nan"))) == 2
    assert "nan_policy=error" in one_line_error(capsys, "train")


def test_debug_flag_and_environment_show_the_traceback(tmp_path, capsys, monkeypatch):
    (tmp_path / "run").write_text("not a folder")
    from patchdpo_fast.errors import UserError

    with pytest.raises(UserError, match=r"train\.output_dir"):
        cli([*train_args(tmp_path), "--debug"])
    monkeypatch.setenv("PATCHDPO_DEBUG", "1")
    with pytest.raises(UserError, match=r"train\.output_dir"):
        cli(train_args(tmp_path))
    monkeypatch.setenv("PATCHDPO_DEBUG", "0")
    assert cli(train_args(tmp_path)) == 2


def test_a_bug_keeps_its_traceback(monkeypatch):
    import patchdpo_fast.ops_demo as demo

    def broken(argv):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(demo, "main", broken)
    with pytest.raises(ZeroDivisionError):
        cli(["ops-demo"])


# -- generate, evaluate, build-pairs -----------------------------------------------------------------------------


def generate_args(tmp_path: Path, references: Path = MINI, *extra: str) -> list[str]:
    return ["generate", "--tiny", "--references", str(references), "--out", str(tmp_path / "gen"), "--subjects",
            "backpack", "--prompts-limit", "1", "--resolution", "64", "--steps", "1", "--no-progress",
            *extra]  # fmt: skip


def corrupt_copy(tmp_path: Path) -> Path:
    refs = Path(shutil.copytree(MINI, tmp_path / "refs"))
    photo = refs / "backpack" / "01.jpg"
    photo.write_bytes(photo.read_bytes()[:300])  # a truncated JPEG: the header reads, the pixels do not
    return refs


def test_generate_argument_errors(tmp_path, capsys):
    assert cli(generate_args(tmp_path, MINI, "--steps", "0")) == 2
    assert "--steps must be >= 1" in one_line_error(capsys, "generate")
    config = tmp_path / "adapter.yaml"
    config.write_text("not: weights\n")
    assert cli(generate_args(tmp_path, MINI, "--ip-adapter", str(config))) == 2
    assert f"--ip-adapter {config}: expected an IP-Adapter .safetensors" in one_line_error(capsys, "generate")
    fake = tmp_path / "adapter.bin"
    fake.write_text("not a zip")
    assert cli(generate_args(tmp_path, MINI, "--ip-adapter", str(fake))) == 2
    assert "not a PyTorch checkpoint" in one_line_error(capsys, "generate")
    assert not (tmp_path / "gen").exists()


def test_corrupt_reference_photo_is_named_before_any_work(tmp_path, capsys):
    refs = corrupt_copy(tmp_path)
    assert cli(generate_args(tmp_path, refs)) == 2
    err = one_line_error(capsys, "generate")
    assert "unreadable reference photo(s)" in err and "01.jpg" in err
    assert not list((tmp_path / "gen").glob("*/*.png"))

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} on the beach\n")
    out = tmp_path / "pairs"
    argv = ["build-pairs", "--references", str(refs), "--prompts", str(prompts), "--out", str(out), "--tiny",
            "-k", "1", "--steps", "1", "--no-progress"]  # fmt: skip
    assert cli(argv) == 2
    err = one_line_error(capsys, "build-pairs")
    assert "unreadable reference image(s)" in err and "01.jpg" in err
    assert not list(out.rglob("*.png"))  # nothing generated before the check


def test_evaluate_names_a_truncated_image(tmp_path, capsys):
    gen = tmp_path / "gen"
    assert cli(generate_args(tmp_path)) == 0
    capsys.readouterr()
    image = next(gen.glob("backpack/*.png"))
    image.write_bytes(image.read_bytes()[:100])
    argv = ["evaluate", "--tiny", "--generated", str(gen), "--references", str(MINI), "--out", str(tmp_path / "s.json")]
    assert cli(argv) == 2
    err = one_line_error(capsys, "evaluate")
    assert "unreadable generated image(s)" in err and image.name in err
    refs = corrupt_copy(tmp_path)
    argv[argv.index(str(MINI))] = str(refs)
    image.unlink()
    assert cli(["generate", *generate_args(tmp_path)[1:]]) == 0
    capsys.readouterr()
    assert cli(argv) == 2
    assert "01.jpg" in one_line_error(capsys, "evaluate")


# -- quality -----------------------------------------------------------------------------------------------------


def test_quality_device_and_visualize_errors(tmp_path, capsys):
    import torch

    from patchdpo_fast.data import write_procedural_manifest

    manifest = write_procedural_manifest(tmp_path / "pairs", num_pairs=2, resolution=64, seed=0)
    base = ["quality", "--manifest", str(manifest), "--no-progress"]
    if not torch.cuda.is_available():
        assert cli([*base, "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA device is available here" in one_line_error(capsys, "quality")
    assert cli([*base, "--device", "gpu0"]) == 2
    assert "--device 'gpu0' is not a device" in one_line_error(capsys, "quality")
    existing = tmp_path / "panels.png"
    existing.write_bytes(b"x")
    assert cli([*base, "--device", "cpu", "--visualize", str(existing)]) == 2
    assert f"--visualize {existing} is a file" in one_line_error(capsys, "quality")


def test_module_entry_points_use_the_same_handling(tmp_path):
    """``python -m patchdpo_fast.train`` (and ``deepspeed patchdpo_fast/train.py``) report like ``patchdpo train``."""
    import subprocess
    import sys

    missing = tmp_path / "missing.yaml"
    proc = subprocess.run([sys.executable, "-m", "patchdpo_fast.train", "--config", str(missing)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"patchdpo train: invalid config: config file not found: {missing}"


def test_error_from_a_dataloader_worker_keeps_only_its_message(tmp_path, capsys):
    from patchdpo_fast.data import write_procedural_manifest

    manifest = write_procedural_manifest(tmp_path / "pairs", num_pairs=4, resolution=64, seed=0)
    for i in (1, 3):
        png = tmp_path / "pairs" / "references" / f"{i:05d}.png"
        png.write_bytes(png.read_bytes()[:200])  # truncated: passes the manifest's quick check, fails to load
    sets = ("data.source=manifest", f"data.manifest_path={manifest}", "data.on_bad_record=skip",
            "data.max_bad_records=1", "data.num_workers=2", "cache.enabled=false")  # fmt: skip
    assert cli(train_args(tmp_path, *sets)) == 2
    err = one_line_error(capsys, "train")
    assert "more than data.max_bad_records=1 bad pairs (2 met" in err and "Original Traceback" not in err
