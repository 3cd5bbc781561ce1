"""quality-train and quality-eval end to end on a few tiny synthetic photos (seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from quality_helpers import synthetic_photos

from patchdpo_fast.errors import UserError
from patchdpo_fast.quality import PatchQualityEstimator
from patchdpo_fast.quality.defects import FAMILIES
from patchdpo_fast.quality.evaluate import main as eval_main
from patchdpo_fast.quality.synthetic import ALL_KINDS
from patchdpo_fast.quality.train_backbone import main as train_main


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Two subjects with two 64 px photos each, in the dreambench256 layout."""
    root = tmp_path_factory.mktemp("photos")
    imgs = synthetic_photos(4, size=64, seed=5)
    for i, img in enumerate(imgs):
        sub = root / ("alpha" if i < 2 else "beta")
        sub.mkdir(exist_ok=True)
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(sub / f"{i:02d}.png")
    return root


def test_quality_train_writes_a_loadable_folder_and_resumes(photo_dir, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["--images", str(photo_dir), "--out", str(out), "--batch-size", "2", "--no-progress"]
    assert train_main([*args, "--minutes", "0.02", "--exclude-subjects", "beta"]) == 0
    cfg = json.loads((out / "quality_config.json").read_text())
    training = cfg["extra"]["training"]
    assert training["step"] >= 1 and training["subjects"] == ["alpha"] and training["excluded_subjects"] == ["beta"]
    # --minutes counts process CPU time by default; wall time is recorded beside it
    assert training["clock"] == "cpu" and training["train_seconds"] == pytest.approx(training["train_cpu_seconds"])
    assert training["train_wall_seconds"] > 0 and training["threads"] >= 1 and training["global_changes"] is True
    assert cfg["calibration"]["kind"] == "linear"
    est = PatchQualityEstimator.from_pretrained(out)
    assert est.grid_size == (16, 16) and est.flip_invariant
    assert (out / "checkpoints" / "latest").is_file()
    # a second run with a larger budget continues from the checkpoint
    minutes = (training["train_seconds"] + 0.5) / 60
    assert train_main([*args, "--minutes", f"{minutes:.4f}", "--exclude-subjects", "beta"]) == 0
    assert "resuming from" in capsys.readouterr().out
    # resuming under another clock is refused (the budget would mix CPU and wall seconds)
    with pytest.raises(UserError, match="clock cpu"):
        train_main([*args, "--minutes", "1", "--exclude-subjects", "beta", "--clock", "wall"])
    # so is a resume with other labels or global changes (the steps done trained on something else)
    with pytest.raises(UserError, match=r"soft_labels True \(now False\)"):
        train_main([*args, "--minutes", "1", "--exclude-subjects", "beta", "--hard-labels"])
    with pytest.raises(UserError, match=r"global_changes True \(now False\)"):
        train_main([*args, "--minutes", "1", "--exclude-subjects", "beta", "--no-global-changes"])
    # and the optimization settings: a resume must not switch the lr (e.g. when the default changes) or batch size
    assert training["settings"]["lr"] == 2e-3
    with pytest.raises(UserError, match=r"lr 0\.002 \(now 0\.0005\)"):
        train_main([*args, "--minutes", "1", "--exclude-subjects", "beta", "--lr", "5e-4"])
    with pytest.raises(UserError, match=r"crop_batch_size 2 \(now 4\)"):
        train_main([*args, "--minutes", "1", "--exclude-subjects", "beta", "--crop-batch-size", "4"])
    with pytest.raises(UserError, match="--no-global-changes needs --recipe offgrid"):
        train_main([*args, "--minutes", "1", "--recipe", "grid", "--no-global-changes"])
    again = json.loads((out / "quality_config.json").read_text())["extra"]["training"]
    assert again["step"] > training["step"]


def test_quality_eval_reports_auroc_and_ap(photo_dir, tmp_path):
    out = tmp_path / "eval.json"
    rc = eval_main(
        ["--images", str(photo_dir), "--estimator", "tiny", "--out", str(out), "--pairs", "1", "--all-subjects"]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["subjects"] == ["alpha", "beta"] and res["pairs"] == 4 and res["grid"] == [16, 16]
    assert 0.0 <= res["overall"]["auroc"] <= 1.0 and 0.0 <= res["overall"]["ap"] <= 1.0
    assert set(res["per_subject"]) == {"alpha", "beta"}
    assert set(res["per_kind"]) == set(FAMILIES) and res["protocol"]["name"] == "offgrid"
    assert 0.0 <= res["baseline"]["overall"]["auroc"] <= 1.0
    # the first version's grid protocol is still there, with the baseline too
    rc = eval_main(
        ["--images", str(photo_dir), "--estimator", "tiny", "--out", str(out), "--pairs", "1", "--all-subjects",
         "--protocol", "grid"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["per_kind"]) == {"paste", "blur", "recolor", "shuffle"} and "baseline" in res


def test_quality_eval_subject_selection_and_errors(photo_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["alpha"], "eval": ["beta"]}))
    base = ["--images", str(photo_dir), "--out", str(out), "--pairs", "1"]
    assert eval_main([*base, "--split-file", str(split)]) == 0
    assert json.loads(out.read_text())["subjects"] == ["beta"]
    assert json.loads(out.read_text())["split"] == "eval"
    with pytest.raises(ValueError, match="subjects not found"):
        eval_main([*base, "--subjects", "gamma"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        eval_main([*base, "--estimator", str(tmp_path / "missing")])
    from patchdpo_fast.cli import main as cli

    assert cli(["quality-eval", *base, "--kinds", "smudge", "--protocol", "grid"]) == 2
    assert capsys.readouterr().err.strip() == (
        "patchdpo quality-eval: unknown --kinds smudge; choose from " + ", ".join(ALL_KINDS)
    )
    assert cli(["quality-eval", *base, "--kinds", "smudge"]) == 2  # the off-grid protocol's families
    assert capsys.readouterr().err.startswith("patchdpo quality-eval: --kinds: unknown defect families ['smudge']")


def test_quality_train_progressive_crops(photo_dir, tmp_path, monkeypatch):
    """The first --crop-fraction of the budget trains on 8 x 8-patch crops at full pixel scale, then whole views."""
    from patchdpo_fast.quality import train_backbone

    calls = []
    real = train_backbone.make_training_pairs

    def spy(sources, grid, g, size=None, **kwargs):
        pairs = real(sources, grid, g, size, **kwargs)
        calls.append((tuple(sources.shape), grid, size, kwargs.get("side_scale", 1.0), tuple(pairs.labels.shape)))
        return pairs

    monkeypatch.setattr(train_backbone, "make_training_pairs", spy)
    out = tmp_path / "q"
    args = ["--images", str(photo_dir), "--out", str(out), "--batch-size", "2", "--no-progress", "--no-resume"]
    assert train_main([*args, "--minutes", "0.03", "--crop-fraction", "0.5", "--crop-batch-size", "3"]) == 0
    crops = [c for c in calls if c[2] == (128, 128)]
    whole = [c for c in calls if c[2] == (256, 256)]
    assert crops and whole and len(crops) + len(whole) == len(calls)
    assert calls[: len(crops)] == crops  # crops first, then whole views
    # 128 px of the 256 px photos (the pixel scale is kept), an 8 x 8 grid, regions twice their fraction of the side
    assert crops[0] == ((3, 3, 128, 128), (8, 8), (128, 128), 2.0, (3, 8, 8))
    assert whole[0] == ((2, 3, 256, 256), (16, 16), (256, 256), 1.0, (2, 16, 16))
    training = json.loads((out / "quality_config.json").read_text())["extra"]["training"]
    assert training["settings"]["crop_fraction"] == 0.5 and training["settings"]["crop_size"] == 128
    assert PatchQualityEstimator.from_pretrained(out).grid_size == (16, 16)
    # the default: crops for the offgrid recipe, none for the first version's grid recipe
    calls.clear()
    assert train_main([*args, "--minutes", "0.01", "--recipe", "grid"]) == 0
    assert calls and all(c[2] == (256, 256) for c in calls)
    training = json.loads((out / "quality_config.json").read_text())["extra"]["training"]
    assert training["settings"]["crop_fraction"] == 0.0
    # a backbone whose grid is not larger than the crops' 8 x 8 patches trains on whole views only
    small = tmp_path / "small"
    PatchQualityEstimator.tiny(seed=0, image_size=128).save_pretrained(small)
    calls.clear()
    assert train_main([*args, "--minutes", "0.01", "--backbone", str(small), "--lr", "1e-3"]) == 0
    assert calls and all(c[2] == (128, 128) and c[1] == (8, 8) and c[3] == 1.0 for c in calls)
    training = json.loads((out / "quality_config.json").read_text())["extra"]["training"]
    assert training["settings"]["crop_fraction"] == 0.0
    with pytest.raises(UserError, match="--crop-size 100 must be a multiple of the patch size"):
        train_main([*args, "--minutes", "0.01", "--crop-size", "100"])
    with pytest.raises(UserError, match=r"--crop-fraction must be in \[0, 1\]"):
        train_main([*args, "--minutes", "0.01", "--crop-fraction", "1.5"])


def test_quality_train_sharpness_and_global_blur_options(photo_dir, tmp_path, monkeypatch):
    """--sharpness-weight sets the written estimator's setting (default 0.3); --sharpness-in-loss trains on the
    joined feature; --no-global-blur reaches the pair maker; all are recorded and checked on resume."""
    from patchdpo_fast.quality import train_backbone

    seen_blur, seen_dims = [], []
    real_pairs = train_backbone.make_training_pairs
    real_loss = train_backbone.dense_patch_loss

    def pairs_spy(*a, **k):
        seen_blur.append(k.get("global_blur", True))
        return real_pairs(*a, **k)

    def loss_spy(ref_feat, gen_feat, *a, **k):
        seen_dims.append(ref_feat.shape[-1])
        return real_loss(ref_feat, gen_feat, *a, **k)

    monkeypatch.setattr(train_backbone, "make_training_pairs", pairs_spy)
    monkeypatch.setattr(train_backbone, "dense_patch_loss", loss_spy)
    args = ["--images", str(photo_dir), "--batch-size", "2", "--no-progress", "--minutes", "0.01"]
    out = tmp_path / "default"
    assert train_main([*args, "--out", str(out)]) == 0
    cfg = json.loads((out / "quality_config.json").read_text())
    assert cfg["sharpness_weight"] == 0.3 and PatchQualityEstimator.from_pretrained(out).sharpness_weight == 0.3
    assert set(seen_blur) == {True} and set(seen_dims) == {128}  # the backbone feature alone is trained
    assert cfg["extra"]["training"]["global_blur"] is True
    seen_blur.clear(), seen_dims.clear()
    out = tmp_path / "joined"
    assert train_main([*args, "--out", str(out), "--sharpness-in-loss", "--sharpness-weight", "0.2"]) == 0
    cfg = json.loads((out / "quality_config.json").read_text())
    assert cfg["sharpness_weight"] == 0.2 and set(seen_dims) == {128 + 4}
    assert cfg["extra"]["training"]["settings"]["sharpness_in_loss"] is True
    with pytest.raises(UserError, match=r"sharpness_in_loss 0.2 \(now 0.0\)"):
        train_main([*args, "--out", str(out), "--minutes", "1"])
    out = tmp_path / "plain"
    assert train_main([*args, "--out", str(out), "--sharpness-weight", "0", "--no-global-blur"]) == 0
    cfg = json.loads((out / "quality_config.json").read_text())
    assert "sharpness_weight" not in cfg and set(seen_blur[-2:]) == {False}
    assert cfg["extra"]["training"]["global_blur"] is False
    with pytest.raises(UserError, match=r"global_blur False \(now True\)"):
        train_main([*args, "--out", str(out), "--minutes", "1", "--sharpness-weight", "0"])
    with pytest.raises(UserError, match="--sharpness-in-loss needs a --sharpness-weight above 0"):
        train_main([*args, "--out", str(out), "--sharpness-in-loss", "--sharpness-weight", "0"])
    with pytest.raises(UserError, match=r"--sharpness-weight must be in \[0, 1\)"):
        train_main([*args, "--out", str(out), "--sharpness-weight", "1"])
    with pytest.raises(UserError, match="--no-global-blur needs --recipe offgrid"):
        train_main([*args, "--out", str(out), "--recipe", "grid", "--no-global-blur"])
    # quality-eval can override the weight of any estimator (the raw similarities are graded)
    res_file = tmp_path / "eval.json"
    base = ["--images", str(photo_dir), "--out", str(res_file), "--pairs", "1", "--all-subjects", "--no-baseline"]
    assert eval_main([*base, "--estimator", str(out), "--sharpness-weight", "0.4"]) == 0
    assert json.loads(res_file.read_text())["estimator_settings"]["sharpness_weight"] == 0.4
    with pytest.raises(UserError, match=r"--sharpness-weight must be in \[0, 1\)"):
        eval_main([*base, "--estimator", str(out), "--sharpness-weight", "-1"])


def test_random_crops_keep_pixels_and_scale():
    from patchdpo_fast.quality.train_backbone import random_crops

    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(50.0), indexing="ij")
    images = torch.stack([torch.stack([ys, xs, ys + 100 * i]) for i in range(5)])  # (5, 3, 40, 50)
    crops = random_crops(images, 16, torch.Generator().manual_seed(0))
    assert crops.shape == (5, 3, 16, 16)
    y0, x0 = crops[:, 0, 0, 0].long(), crops[:, 1, 0, 0].long()
    for i in range(5):
        assert torch.equal(crops[i], images[i, :, y0[i] : y0[i] + 16, x0[i] : x0[i] + 16])
    assert len({(int(a), int(b)) for a, b in zip(y0, x0, strict=True)}) > 1  # each image its own offset


def test_make_training_pairs_side_scale_enlarges_regions(photos, monkeypatch):
    from patchdpo_fast.quality import train_backbone
    from patchdpo_fast.quality.defects import TRAIN_RECIPE

    seen = []
    real = train_backbone.make_defect_pairs
    monkeypatch.setattr(train_backbone, "make_defect_pairs", lambda *a, **k: seen.append(k["recipe"]) or real(*a, **k))
    for scale in (1.0, 2.0):
        train_backbone.make_training_pairs(photos, (8, 8), torch.Generator().manual_seed(4), (64, 64), side_scale=scale)
    lo, hi = TRAIN_RECIPE.side
    assert seen[0] == TRAIN_RECIPE and seen[1].side == (2 * lo, min(0.6, 2 * hi))
    assert seen[1].regions == TRAIN_RECIPE.regions and seen[1].smear_sigma_px == TRAIN_RECIPE.smear_sigma_px


def test_quality_refit_script_sets_views_and_refits_the_calibration(photo_dir, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "quality_refit.py"
    spec = importlib.util.spec_from_file_location("quality_refit", script)
    refit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refit)
    folder = tmp_path / "est"
    PatchQualityEstimator.tiny(seed=0, calibration=(0.5, 0.9)).save_pretrained(
        folder, extra={"training": {"seed": 3, "excluded_subjects": ["beta"], "step": 7}}
    )
    weights = (folder / "backbone" / "model.safetensors").read_bytes()
    backbone_cfg = (folder / "backbone" / "config.json").stat().st_mtime_ns
    args = [str(folder), "--images", str(photo_dir), "--reference-scales", "1,1.2", "--reference-shift", "0.5"]
    assert refit.main(args) == 0
    # the backbone is not rewritten, only the settings
    assert (folder / "backbone" / "model.safetensors").read_bytes() == weights
    assert (folder / "backbone" / "config.json").stat().st_mtime_ns == backbone_cfg
    assert "reference_views changed" in capsys.readouterr().out
    cfg = json.loads((folder / "quality_config.json").read_text())
    assert cfg["reference_views"] == {"scales": [1.0, 1.2], "crops": 3, "shift": 0.5}
    assert cfg["calibration"]["low"] != 0.5 and cfg["calibration"]["info"]["images"] == 2  # alpha's two photos
    assert cfg["extra"]["training"]["step"] == 7  # the training record is kept
    (entry,) = cfg["extra"]["refits"]
    assert (
        entry["seed"] == 3
        and entry["subjects"] == ["alpha"]
        and set(entry["changed"])
        == {
            "calibration",
            "reference_views",
        }
    )
    assert PatchQualityEstimator.from_pretrained(folder).reference_views.scales == (1.0, 1.2)
    with pytest.raises(UserError, match=r"must contain 1\.0"):
        refit.main([str(folder), "--images", str(photo_dir), "--reference-scales", "1.2"])
    with pytest.raises(UserError, match="is not an estimator folder"):
        refit.main([str(tmp_path), "--images", str(photo_dir)])


def test_quality_train_writes_reference_views_and_eval_overrides_them(photo_dir, tmp_path):
    out = tmp_path / "q"
    base = ["--images", str(photo_dir), "--out", str(out), "--batch-size", "2", "--no-progress", "--minutes", "0.01"]
    assert train_main([*base, "--reference-shift", "0.25"]) == 0
    cfg = json.loads((out / "quality_config.json").read_text())
    assert cfg["reference_views"] == {"scales": [1.0, 1.2], "crops": 3, "shift": 0.25}
    assert cfg["extra"]["training"]["reference_views"] == cfg["reference_views"]
    res = tmp_path / "eval.json"
    ev = ["--images", str(photo_dir), "--out", str(res), "--pairs", "1", "--all-subjects", "--estimator", str(out)]
    assert eval_main(ev) == 0
    graded = json.loads(res.read_text())
    # the raw-pixel baseline matches against the same views as the estimator
    assert graded["estimator_settings"]["reference_views"]["shift"] == 0.25
    assert graded["baseline"]["settings"]["reference_views"] == cfg["reference_views"]
    assert eval_main([*ev, "--reference-scales", "1", "--reference-shift", "0"]) == 0
    plain = json.loads(res.read_text())
    assert (
        "reference_views" not in plain["estimator_settings"] and "reference_views" not in plain["baseline"]["settings"]
    )
    with pytest.raises(UserError, match=r"`crops` must be an integer in \[1, 5\]"):
        eval_main([*ev, "--reference-crops", "9"])
    with pytest.raises(UserError, match="comma-separated numbers"):
        train_main([*base, "--reference-scales", "1;1.2"])


def test_quality_train_threads_default_and_override(photo_dir, tmp_path):
    from patchdpo_fast.quality.train_backbone import train_threads

    cpu = torch.device("cpu")
    assert train_threads(None, "tiny", cpu, 8) == 1  # the tiny backbone's steps run on one thread on CPU
    assert train_threads(None, "/models/dinov2", cpu, 8) == 2 and train_threads(None, "/models/dinov2", cpu, 1) == 1
    assert train_threads(None, "tiny", torch.device("cuda"), 8) == 2
    assert train_threads(3, "tiny", cpu, 8) == 3  # an explicit --threads wins
    entry = torch.get_num_threads()
    args = ["--images", str(photo_dir), "--batch-size", "2", "--no-progress", "--minutes", "0.005", "--device", "cpu"]
    assert train_main([*args, "--out", str(tmp_path / "default")]) == 0
    record = json.loads((tmp_path / "default" / "quality_config.json").read_text())["extra"]["training"]
    assert record["threads"] == 1 and record["calibration_threads"] == min(2, entry)
    assert torch.get_num_threads() == entry  # an in-process caller gets its setting back
    assert train_main([*args, "--out", str(tmp_path / "two"), "--threads", "2"]) == 0
    record = json.loads((tmp_path / "two" / "quality_config.json").read_text())["extra"]["training"]
    assert record["threads"] == 2 and record["calibration_threads"] == 2
    assert torch.get_num_threads() == entry
    with pytest.raises(UserError, match="--threads must be >= 1, got 0"):
        train_main([*args, "--out", str(tmp_path / "zero"), "--threads", "0"])
