"""The honest benchmark: off-grid defects, labels from covered fraction, subject splits, raw-pixel baseline, LOFO."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from quality_helpers import synthetic_photos

from patchdpo_fast.errors import UserError
from patchdpo_fast.quality.baseline import RawPixelMatcher
from patchdpo_fast.quality.defects import (
    BENCHMARK_RECIPE,
    FAMILIES,
    TRAIN_RECIPE,
    GlobalChange,
    coverage_labels,
    make_defect_pairs,
    parse_families,
    region_mask,
)
from patchdpo_fast.quality.evaluate import benchmark, grade
from patchdpo_fast.quality.evaluate import main as eval_main
from patchdpo_fast.quality.images import (
    DREAMBENCH_SPLITS,
    DREAMBENCH_TEST_SUBJECTS,
    DREAMBENCH_TRAIN_SUBJECTS,
    DREAMBENCH_VAL_SUBJECTS,
    PhotoSet,
    read_split_file,
)
from patchdpo_fast.quality.train_backbone import main as train_main
from patchdpo_fast.quality.train_backbone import make_training_pairs

NONE = GlobalChange.none()


# ---------------------------------------------------------------------------------------------------- labels
def test_labels_from_coverage():
    coverage = torch.tensor([[0.0, 0.005, 0.01, 0.02, 0.3, 0.5, 0.51, 0.9, 1.0, 0.8]])
    change = torch.tensor([[0.0, 0.0, 0.0, 0.01, 0.05, 0.2, 0.2, 0.2, 0.5, 0.01]])
    labels = coverage_labels(coverage, change, clean_max=0.01, positive_min=0.5, min_change=0.03)
    # clean up to 1 %, left out in (1 %, 50 %], corrupted above half when the change is visible, else left out
    assert labels.tolist() == [[0, 0, 0, -1, -1, -1, 1, 1, 1, -1]]
    assert labels.dtype == torch.int8


def test_coverage_is_the_mean_of_the_defect_mask_and_drives_the_labels(photos):
    g = torch.Generator().manual_seed(3)
    pairs = make_defect_pairs(photos, (16, 16), g, gen_change=NONE, recipe=BENCHMARK_RECIPE)
    cell = photos.shape[-1] // 16
    torch.testing.assert_close(pairs.coverage, F.avg_pool2d(pairs.alpha[:, None], cell)[:, 0])
    assert (pairs.labels[pairs.coverage <= 0.01] == 0).all()
    assert (pairs.coverage[pairs.labels == 1] > 0.5).all()
    # outside every defect the generated view is the photo (no global change)
    untouched = pairs.alpha == 0
    assert ((pairs.generated - photos).abs().amax(1)[untouched] < 1e-5).all()
    torch.testing.assert_close(pairs.reference, photos)
    # kinds: a family code where covered, 0 on clean cells
    assert (pairs.kinds[pairs.labels == 0] == 0).all() and (pairs.kinds[pairs.labels == 1] > 0).all()


def test_regions_do_not_follow_the_grid(photos):
    """Many cells are partly covered: the regions are free shapes, not unions of grid cells."""
    g = torch.Generator().manual_seed(0)
    cov = torch.cat([make_defect_pairs(photos, (16, 16), g, gen_change=NONE).coverage for _ in range(3)])
    partial = (cov > 0.02) & (cov < 0.98)
    assert int(partial.sum()) > 0.3 * int((cov > 0.02).sum())


@pytest.mark.parametrize("shape", ["rect", "ellipse", "blob"])
def test_region_mask_shapes(shape):
    g = torch.Generator().manual_seed(0)
    m = region_mask((96, 96), (48.0, 40.0), (12.0, 20.0), 0.3, shape, 0.0, g)
    area = float(m.sum())
    expected = {"rect": 4 * 12 * 20, "ellipse": math.pi * 12 * 20, "blob": None}[shape]
    if expected is not None:
        assert area == pytest.approx(expected, rel=0.05)
    else:
        assert 0.2 * math.pi * 240 < area < 2.0 * math.pi * 240
    assert set(m.unique().tolist()) <= {0.0, 1.0} and m[48, 40] == 1.0
    soft = region_mask((96, 96), (48.0, 40.0), (12.0, 20.0), 0.3, shape, 2.0, torch.Generator().manual_seed(0))
    assert ((soft > 0.01) & (soft < 0.99)).any() and float(soft.sum()) == pytest.approx(area, rel=0.1)
    with pytest.raises(ValueError, match="unknown shape"):
        region_mask((8, 8), (4.0, 4.0), (2.0, 2.0), 0.0, "star")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_changes_the_covered_pixels(photos, family):
    g = torch.Generator().manual_seed(1)
    pairs = make_defect_pairs(photos, (16, 16), g, gen_change=NONE, recipe=BENCHMARK_RECIPE.only((family,)))
    assert set(pairs.kinds.unique().tolist()) <= {0, FAMILIES.index(family) + 1}
    inside = pairs.alpha > 0.99
    diff = (pairs.generated - photos).abs().mean(1)
    assert inside.any() and float(diff[inside].mean()) > 0.02


def test_pairs_are_reproducible_and_global_changes_are_not_defects(photos):
    a = make_defect_pairs(photos, (16, 16), torch.Generator().manual_seed(7))
    b = make_defect_pairs(photos, (16, 16), torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.generated, b.generated)
    assert torch.equal(a.labels, b.labels)
    clean = make_defect_pairs(photos, (16, 16), torch.Generator().manual_seed(7), recipe=None)
    assert (clean.labels == 0).all() and (clean.coverage == 0).all()
    assert (clean.generated - photos).abs().mean() > 0.01  # the view did change globally


def test_parse_families():
    assert parse_families("paste,smear,blur") == ("foreign", "smear")
    assert parse_families(None) == FAMILIES
    with pytest.raises(ValueError, match="unknown defect families"):
        parse_families("smudge")
    with pytest.raises(ValueError, match="leaves no family"):
        BENCHMARK_RECIPE.without(FAMILIES)


def test_training_recipe_differs_from_the_benchmark_and_excludes_families(photos):
    assert TRAIN_RECIPE.side != BENCHMARK_RECIPE.side and TRAIN_RECIPE.regions != BENCHMARK_RECIPE.regions
    g = torch.Generator().manual_seed(0)
    rest = [f for f in FAMILIES if f != "missing"]
    codes = set()
    for _ in range(4):
        pairs = make_training_pairs(photos, (16, 16), g, (64, 64), families=rest)
        codes |= set(pairs.kinds.unique().tolist())
    assert FAMILIES.index("missing") + 1 not in codes and len(codes) > 2


def test_training_pairs_without_global_changes(photos):
    """The ablation switch: both views are the photo itself apart from the defects (identity correspondence)."""
    g = torch.Generator().manual_seed(3)
    plain = make_training_pairs(photos, (16, 16), g, (64, 64), global_changes=False)
    outside = (plain.alpha == 0)[:, None].expand_as(plain.generated)
    assert outside.float().mean() > 0.3 and (plain.labels == 1).any()
    torch.testing.assert_close(plain.generated[outside], plain.reference[outside], rtol=0, atol=1e-6)
    cells = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij"), -1)
    torch.testing.assert_close(plain.gen_to_ref, cells.expand_as(plain.gen_to_ref), rtol=0, atol=1e-4)
    changed = make_training_pairs(photos, (16, 16), torch.Generator().manual_seed(3), (64, 64))
    assert not torch.allclose(changed.gen_to_ref, cells.expand_as(changed.gen_to_ref), atol=1e-2)
    with pytest.raises(ValueError, match="needs recipe='offgrid'"):
        make_training_pairs(photos, (16, 16), g, (64, 64), recipe="grid", global_changes=False)


def test_training_pairs_without_global_blur(photos, monkeypatch):
    """``global_blur=False`` drops only the whole-image blur of both views; the other global changes stay."""
    from patchdpo_fast.quality import defects
    from patchdpo_fast.quality.defects import TRAIN_CHANGE, TRAIN_REF_CHANGE

    seen = []
    real = defects._post
    monkeypatch.setattr(defects, "_post", lambda img, change, g: seen.append(change) or real(img, change, g))
    make_training_pairs(photos, (16, 16), torch.Generator().manual_seed(3), (64, 64))
    assert {c.blur_p for c in seen} == {TRAIN_CHANGE.blur_p, TRAIN_REF_CHANGE.blur_p}
    seen.clear()
    pairs = make_training_pairs(photos, (16, 16), torch.Generator().manual_seed(3), (64, 64), global_blur=False)
    assert seen and all(c.blur_p == 0.0 for c in seen)
    assert {c.jpeg_p for c in seen} == {TRAIN_CHANGE.jpeg_p, TRAIN_REF_CHANGE.jpeg_p}
    assert seen[0].geometry == TRAIN_CHANGE.geometry and seen[1].geometry == TRAIN_REF_CHANGE.geometry
    cells = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij"), -1)
    assert not torch.allclose(pairs.gen_to_ref, cells.expand_as(pairs.gen_to_ref), atol=1e-2)  # geometry kept
    with pytest.raises(ValueError, match="needs recipe='offgrid'"):
        make_training_pairs(photos, (16, 16), torch.Generator(), (64, 64), recipe="grid", global_blur=False)


# ---------------------------------------------------------------------------------------------------- splits
def test_subject_splits_are_fixed_disjoint_and_recorded():
    train, val, test = map(set, (DREAMBENCH_TRAIN_SUBJECTS, DREAMBENCH_VAL_SUBJECTS, DREAMBENCH_TEST_SUBJECTS))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 20 and len(val) == len(test) == 4
    assert set(DREAMBENCH_SPLITS["eval"]) == val | test
    from patchdpo_fast.quality.images import __file__ as images_file

    asset = __import__("pathlib").Path(images_file).parent / "assets" / "dreambench_split.json"
    recorded = json.loads(asset.read_text())
    for key in ("train", "val", "test", "eval"):
        assert sorted(recorded[key]) == sorted(DREAMBENCH_SPLITS[key]), key
    assert sorted(read_split_file(asset, "test")) == sorted(DREAMBENCH_TEST_SUBJECTS)


def test_dreambench_folder_holds_exactly_the_split(dreambench):
    found = {p.name for p in dreambench.iterdir() if p.is_dir()}
    assert found == set(DREAMBENCH_SPLITS["train"]) | set(DREAMBENCH_SPLITS["eval"])


# ---------------------------------------------------------------------------------------------------- baseline
def test_raw_pixel_baseline():
    imgs = synthetic_photos(2, size=64, seed=1)
    raw = RawPixelMatcher((8, 8), patch_px=8)
    assert raw.features(imgs).shape == (2, 8, 8, 192)
    torch.testing.assert_close(raw.estimate(imgs, imgs).generated_similarity, torch.ones(2, 8, 8))
    # nearest-patch, not positional: a shift by whole cells keeps every (non-wrapped) patch exactly matched
    shifted = torch.roll(imgs, shifts=8, dims=-1)
    sim = raw.estimate(imgs, shifted).generated_similarity
    torch.testing.assert_close(sim[:, :, 1:], torch.ones(2, 8, 7))
    # a patch replaced by noise is the least similar one
    bad = imgs.clone()
    bad[:, :, 16:24, 24:32] = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sim = raw.estimate(imgs, bad).generated_similarity
    assert (sim.flatten(1).argmin(1) == 2 * 8 + 3).all()
    with pytest.raises(ValueError, match="positive"):
        RawPixelMatcher((0, 8))


# ---------------------------------------------------------------------------------------------------- grading
def test_grade_leaves_partly_covered_patches_out():
    rng = np.random.default_rng(0)
    labels = rng.choice([-1, 0, 1], size=(6, 4, 4), p=[0.2, 0.6, 0.2]).astype(np.int8)
    labels[0, 0, :3] = [0, 1, -1]
    coverage = np.where(labels == 1, 0.9, np.where(labels == -1, 0.3, 0.0))
    kinds = np.where(labels == 1, 1, 0)
    sim = np.where(labels == 1, 0.2, 0.9) + 0.01 * rng.random(labels.shape)
    sim = np.where(labels == -1, -1.0, sim)  # the lowest similarity of all, but left out of AUROC / AP
    res = grade(sim, sim, labels, kinds, coverage, np.array(list("aabbcc")))
    assert res["overall"]["auroc"] == 1.0 and res["overall"]["ap"] == 1.0
    assert res["per_family"]["smear"]["auroc"] == 1.0 and np.isnan(res["per_family"]["recolor"]["auroc"])
    assert res["partial"]["auroc"] == 1.0  # partly covered (coverage 0.3) against clean
    assert set(res["per_subject"]) == {"a", "b", "c"}


def test_benchmark_reports_the_baseline_beside(tiny_estimator, photos):
    photo_set = PhotoSet(photos, ["a", "a", "b", "b"], [None] * 4)
    res = benchmark(tiny_estimator, photo_set, pairs_per_image=1, seed=0)
    assert res["pairs"] == 4 and set(res["per_family"]) == set(FAMILIES)
    assert res["corrupted_patches"] > 0 and res["left_out_patches"] > 0
    assert set(res["baseline"]) >= {"overall", "per_family", "per_subject"}
    assert res["auroc_above_baseline"] == pytest.approx(res["overall"]["auroc"] - res["baseline"]["overall"]["auroc"])
    again = benchmark(tiny_estimator, photo_set, pairs_per_image=1, seed=0, baseline=False)
    assert again["overall"] == res["overall"] and "baseline" not in again


# ---------------------------------------------------------------------------------------------------- CLI + LOFO
@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i, img in enumerate(synthetic_photos(4, size=64, seed=9)):
        sub = root / ("alpha" if i < 2 else "beta")
        sub.mkdir(exist_ok=True)
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(sub / f"{i}.png")
    return root


def test_leave_one_family_out(photo_dir, tmp_path, capsys):
    lofo = tmp_path / "lofo"
    base = ["--images", str(photo_dir), "--minutes", "0.01", "--batch-size", "2", "--no-progress"]
    assert train_main([*base, "--out", str(lofo / "smear"), "--exclude-families", "blur"]) == 0  # alias of smear
    record = json.loads((lofo / "smear" / "quality_config.json").read_text())["extra"]["training"]
    assert "smear" not in record["families"] and record["excluded_families"] == ["smear"]
    assert record["clock"] == "cpu" and record["train_cpu_seconds"] > 0 and record["train_wall_seconds"] > 0
    out = tmp_path / "lofo.json"
    args = ["--images", str(photo_dir), "--all-subjects", "--pairs", "1", "--out", str(out), "--lofo", str(lofo)]
    assert eval_main([*args, "--families", "smear"]) == 0
    res = json.loads(out.read_text())
    assert set(res["per_family"]) == {"smear"} and res["trained_families"]["smear"] == record["families"]
    assert "raw-pixel" in capsys.readouterr().out and "baseline_mean_auroc" in res
    # an estimator that saw the family is refused, a missing one too
    assert train_main([*base, "--out", str(lofo / "recolor")]) == 0
    with pytest.raises(UserError, match="was trained on it"):
        eval_main([*args, "--families", "recolor"])
    with pytest.raises(UserError, match="no estimator for 'missing'"):
        eval_main([*args, "--families", "missing"])
    with pytest.raises(UserError, match="leaves no defect family"):
        train_main([*base, "--out", str(tmp_path / "x"), "--exclude-families", ",".join(FAMILIES)])


def test_trained_families_from_the_training_record():
    from patchdpo_fast.quality.evaluate import trained_families

    assert trained_families({"families": ["smear", "recolor"], "recipe": {"name": "offgrid"}}) == ["smear", "recolor"]
    # a --recipe grid record has families None and its grid kinds, mapped to the families they belong to
    grid = {"families": None, "recipe": {"name": "grid", "kinds": ["paste", "blur", "recolor", "shuffle"]}}
    assert trained_families(grid) == ["foreign", "smear", "recolor", "resample"]
    assert trained_families({"backbone": "tiny"}) == ["foreign", "smear", "recolor", "resample"]  # first version
    assert trained_families(None) is None


def test_quality_eval_split_option(photo_dir, tmp_path):
    out = tmp_path / "e.json"
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [], "val": ["alpha"], "test": ["beta"]}))
    base = ["--images", str(photo_dir), "--out", str(out), "--pairs", "1", "--no-baseline"]
    assert eval_main([*base, "--split-file", str(split), "--split", "test"]) == 0
    res = json.loads(out.read_text())
    assert res["subjects"] == ["beta"] and res["split"] == "test" and "baseline" not in res
    assert eval_main([*base, "--split-file", str(split)]) == 0  # 'eval' = val + test
    assert json.loads(out.read_text())["subjects"] == ["alpha", "beta"]
    with pytest.raises(UserError, match="dreambench256 layout"):
        eval_main([*base, "--split", "val"])
    assert eval_main([*base, "--all-subjects", "--estimator", "raw-pixel"]) == 0
    assert json.loads(out.read_text())["overall"]["auroc"] > 0.5


def test_soft_labels_train_on_partly_covered_cells(photos):
    """With soft labels the classification loss of the generated side sees the partly covered cells (target
    1 - coverage); with hard labels it leaves them out: changing only their features changes the loss or not."""
    from patchdpo_fast.quality.train_backbone import _AffineHead, dense_patch_loss

    pairs = make_defect_pairs(photos, (8, 8), torch.Generator().manual_seed(0), gen_change=NONE)
    partial = (pairs.coverage > 0.1) & (pairs.coverage <= 0.5)
    assert partial.any()
    torch.testing.assert_close(pairs.quality[partial], 1 - pairs.coverage[partial])
    ref = torch.randn(4, 8, 8, 16, generator=torch.Generator().manual_seed(0))
    gen = torch.randn(4, 8, 8, 16, generator=torch.Generator().manual_seed(1))
    moved = gen.clone()
    moved[partial] = torch.randn(int(partial.sum()), 16, generator=torch.Generator().manual_seed(2))
    head = _AffineHead()
    for soft in (True, False):
        _, a = dense_patch_loss(ref, gen, pairs, head, soft_labels=soft)
        _, b = dense_patch_loss(ref, moved, pairs, head, soft_labels=soft)
        assert np.isfinite(a["loss"]) and a["bce_g"] > 0
        assert (a["bce_g"] != pytest.approx(b["bce_g"], rel=1e-6)) == soft
