"""PatchQualityEstimator: self match, localized corruption, flip invariance, mask, calibration, resizing, I/O."""

from __future__ import annotations

import json

import pytest
import torch

from patchdpo_fast.quality import TINY_TRAINED_DIR, Calibration, PatchQualityEstimator, QualityMaps, resize_to_latent
from patchdpo_fast.quality.images import load_photos
from patchdpo_fast.quality.metrics import auroc


def _paste(ref: torch.Tensor, donor: torch.Tensor, rows: slice, cols: slice, cell: int):
    """Copy of ``ref`` with cells ``rows x cols`` (of ``cell`` pixels) replaced by the donor's top-left corner."""
    gen = ref.clone()
    y0, y1, x0, x1 = rows.start * cell, rows.stop * cell, cols.start * cell, cols.stop * cell
    gen[..., y0:y1, x0:x1] = donor[..., : y1 - y0, : x1 - x0]
    truth = torch.zeros(ref.shape[-2] // cell, ref.shape[-1] // cell, dtype=torch.bool)
    truth[rows, cols] = True
    return gen, truth


def _lowest_cells_are(similarity: torch.Tensor, truth: torch.Tensor) -> bool:
    k = int(truth.sum())
    lowest = set(similarity.flatten().argsort()[:k].tolist())
    return lowest == set(truth.flatten().nonzero().flatten().tolist())


def test_image_against_itself_is_perfect(tiny_estimator, photos):
    maps = tiny_estimator.estimate(photos[:2], photos[:2])
    assert isinstance(maps, QualityMaps) and maps.grid == (16, 16)
    for m in (maps.generated, maps.reference):
        assert m.shape == (2, 16, 16) and m.dtype == torch.float32
        torch.testing.assert_close(m, torch.ones_like(m), atol=1e-4, rtol=0)
    # also with a fitted-looking calibration (high < 1): still exactly 1 after clamping
    est = PatchQualityEstimator(tiny_estimator.backbone, calibration=(0.8, 0.95))
    assert (est.estimate(photos[:1], photos[:1]).generated == 1.0).all()


def test_lower_quality_exactly_where_a_corruption_was_pasted(tiny_estimator, photos):
    gen, truth = _paste(photos[:2], photos[2:4], slice(4, 8), slice(9, 13), cell=8)
    maps = tiny_estimator.estimate(photos[:2], gen)
    for b in range(2):
        assert _lowest_cells_are(maps.generated_similarity[b], truth)
        assert maps.generated[b][truth].max() < maps.generated[b][~truth].min()


def test_real_photo_corruption_is_localized(tiny_estimator, dreambench):
    photos = load_photos(dreambench, size=256, subjects=["dog", "clock"])
    ref, donor = photos.images[:1], photos.images[-1:]  # a dog photo; a clock photo supplies the corruption
    gen, truth = _paste(ref, donor, slice(3, 6), slice(8, 12), cell=16)  # 256 px photo, 16 x 16 grid
    maps = tiny_estimator.estimate(ref, gen)
    assert _lowest_cells_are(maps.generated_similarity[0], truth)
    assert maps.generated[0][truth].max() < maps.generated[0][~truth].min()
    if TINY_TRAINED_DIR.is_dir():
        # the trained features use more context: a few clean cells next to the subject drop too, so the check is
        # a ranking one (AUROC of this single image) and a clear gap of the calibrated quality
        trained = PatchQualityEstimator.tiny_trained().estimate(ref, gen)
        sim = trained.generated_similarity[0]
        assert auroc(-sim.flatten().numpy(), truth.flatten().numpy()) > 0.97
        assert trained.generated[0][truth].mean() < trained.generated[0][~truth].mean() - 0.5


def test_flip_of_the_generated_image_flips_the_maps(tiny_estimator, photos):
    gen, _ = _paste(photos[:2], photos[2:4], slice(2, 5), slice(1, 7), cell=8)
    maps = tiny_estimator.estimate(photos[:2], gen)
    flipped = tiny_estimator.estimate(photos[:2], gen.flip(-1))
    torch.testing.assert_close(flipped.generated, maps.generated.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped.reference, maps.reference, atol=1e-5, rtol=0)
    # a mirrored copy of the reference is a perfect match
    mirrored = tiny_estimator.estimate(photos[:1], photos[:1].flip(-1))
    torch.testing.assert_close(mirrored.generated, torch.ones(1, 16, 16), atol=1e-4, rtol=0)


def test_reference_mask(tiny_estimator, photos):
    mask = torch.zeros(2, 128, 128)
    mask[:, :, :64] = 1.0  # left half is the subject
    maps = tiny_estimator.estimate(photos[:2], photos[:2], reference_mask=mask)
    fg = maps.reference_foreground
    assert fg is not None and fg[:, :, :8].all() and not fg[:, :, 8:].any()
    # background reference patches are neutral on the reference map ...
    assert (maps.reference[:, :, 8:] == 1.0).all()
    # ... and are no match candidates: generated patches on the right no longer find themselves
    assert (maps.generated_similarity[:, :, :8] > 0.9999).all()
    assert (maps.generated_similarity[:, :, 8:] < 0.9999).all()
    # a mask at another resolution and (B, 1, H, W) layout means the same
    small = torch.nn.functional.interpolate(mask[:, None], size=(32, 32))
    again = tiny_estimator.estimate(photos[:2], photos[:2], reference_mask=small)
    torch.testing.assert_close(again.generated, maps.generated)
    with pytest.raises(ValueError, match="`reference_mask` marks no patch as foreground"):
        tiny_estimator.estimate(photos[:2], photos[:2], reference_mask=torch.zeros(2, 128, 128))
    with pytest.raises(ValueError, match="`reference_mask` must be"):
        tiny_estimator.estimate(photos[:2], photos[:2], reference_mask=torch.ones(3, 128, 128))


def test_one_reference_for_many_generated_images(tiny_estimator, photos):
    maps = tiny_estimator.estimate(photos[:1], photos[:3])
    assert maps.generated.shape == (3, 16, 16)
    single = tiny_estimator.estimate(photos[:1], photos[1:2])
    torch.testing.assert_close(maps.generated[1], single.generated[0])
    torch.testing.assert_close(maps.reference[1], single.reference[0])


def test_inputs_of_other_sizes_and_uint8(tiny_estimator, photos):
    big = torch.nn.functional.interpolate(photos[:2], size=(200, 160), mode="bilinear", antialias=True)
    assert tiny_estimator.estimate(big, big).generated.shape == (2, 16, 16)
    as_u8 = (photos[:1] * 255).round().to(torch.uint8)
    torch.testing.assert_close(
        tiny_estimator.estimate(as_u8, as_u8).generated, torch.ones(1, 16, 16), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    ("ref", "gen", "match"),
    [
        (torch.rand(2, 3, 64, 64) * 255, torch.rand(2, 3, 64, 64), "`reference` must hold values in \\[0, 1\\]"),
        (torch.rand(2, 3, 64, 64), torch.rand(2, 4, 64, 64), "`generated` must be a \\(B, 3, H, W\\) image tensor"),
        (torch.rand(3, 3, 64, 64), torch.rand(2, 3, 64, 64), "`reference` must be \\(B, 3, H, W\\) with B = 2"),
        (torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64), "`generated` must be a \\(B, 3, H, W\\)"),
    ],
)
def test_bad_images_raise(tiny_estimator, ref, gen, match):
    with pytest.raises(ValueError, match=match):
        tiny_estimator.estimate(ref, gen)


def test_quality_panel(tiny_estimator, photos):
    from patchdpo_fast.quality.visualize import quality_panel

    gen, _ = _paste(photos[:1], photos[1:2], slice(2, 6), slice(2, 6), cell=8)
    panel = quality_panel(photos[:1], gen, tiny_estimator.estimate(photos[:1], gen), size=64, gap=2)
    assert panel.size == (4 * 64 + 3 * 2, 64) and panel.mode == "RGB"


def test_calibration():
    cal = Calibration(0.5, 0.9)
    s = torch.tensor([0.0, 0.5, 0.7, 0.9, 1.0])
    torch.testing.assert_close(cal(s), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert Calibration.from_any(None) == Calibration(0.0, 1.0)
    assert Calibration.from_any((0.5, 0.9)) == cal
    assert Calibration.from_any(cal.to_dict()) == cal
    with pytest.raises(ValueError, match="low < high"):
        Calibration(0.9, 0.5)
    with pytest.raises(ValueError, match="`calibration` must be"):
        Calibration.from_any("linear")


def test_fit_calibration_orders_the_anchors(tiny_estimator, photos):
    est = PatchQualityEstimator(tiny_estimator.backbone)
    cal = est.fit_calibration(photos, pairs_per_image=1)
    assert est.calibration is cal
    assert -1.0 <= cal.low < cal.high <= 1.0
    assert cal.info["corrupted_patches"] > 0 and cal.info["clean_patches"] > 0


def test_resize_to_latent():
    q = torch.rand(2, 16, 16)
    up = resize_to_latent(q, (64, 64))
    assert up.shape == (2, 64, 64) and float(up.min()) >= 0.0 and float(up.max()) <= 1.0
    down = resize_to_latent(q, (8, 8))
    torch.testing.assert_close(down, torch.nn.functional.avg_pool2d(q[:, None], 2)[:, 0])
    assert resize_to_latent(q[:, None], (32, 32), mode="bilinear").shape == (2, 1, 32, 32)
    torch.testing.assert_close(resize_to_latent(q, (16, 16)), q)
    maps = QualityMaps(q, 1 - q, q, 1 - q)
    q_ref, q_gen = resize_to_latent(maps, (32, 32))
    torch.testing.assert_close(q_gen, resize_to_latent(q, (32, 32)))
    torch.testing.assert_close(q_ref, resize_to_latent(1 - q, (32, 32)))
    with pytest.raises(ValueError, match="`maps` must be"):
        resize_to_latent(torch.rand(2, 3, 4, 4), (8, 8))
    with pytest.raises(ValueError, match="`latent_hw` must be"):
        resize_to_latent(q, (0, 8))
    with pytest.raises(ValueError, match="`mode` must be"):
        resize_to_latent(q, (8, 8), mode="nearest")


def test_save_and_load_round_trip(tmp_path, photos):
    est = PatchQualityEstimator.tiny(seed=3, calibration=Calibration(0.6, 0.95, {"note": "test"}), flip_invariant=False)
    folder = est.save_pretrained(tmp_path / "est")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["backbone/config.json", "backbone/model.safetensors", "quality_config.json"]
    cfg = json.loads((folder / "quality_config.json").read_text())
    assert cfg["calibration"]["low"] == 0.6 and cfg["calibration"]["info"] == {"note": "test"}
    loaded = PatchQualityEstimator.from_pretrained(folder)
    assert loaded.calibration == est.calibration and loaded.flip_invariant is False
    gen, _ = _paste(photos[:2], photos[2:4], slice(0, 3), slice(0, 3), cell=8)
    a, b = est.estimate(photos[:2], gen), loaded.estimate(photos[:2], gen)
    torch.testing.assert_close(a.generated, b.generated)
    torch.testing.assert_close(a.reference_similarity, b.reference_similarity)
    # settings can be overridden at load time
    assert PatchQualityEstimator.from_pretrained(folder, flip_invariant=True).flip_invariant is True


def test_from_pretrained_plain_transformers_folders(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14)
    Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    (tmp_path / "dino" / "preprocessor_config.json").write_text(
        json.dumps({"crop_size": {"height": 112, "width": 112}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    est = PatchQualityEstimator.from_pretrained(tmp_path / "dino")
    assert est.image_size == (112, 112) and est.grid_size == (8, 8) and est.image_mean == (0.5, 0.5, 0.5)
    x = torch.rand(1, 3, 90, 90)
    torch.testing.assert_close(est.estimate(x, x).generated, torch.ones(1, 8, 8), atol=1e-4, rtol=0)


def test_shipped_trained_tiny_estimator():
    if not TINY_TRAINED_DIR.is_dir():
        pytest.skip(f"the trained tiny estimator is not installed ({TINY_TRAINED_DIR} is missing)")
    est = PatchQualityEstimator.tiny_trained()
    c = est.calibration
    assert est.grid_size == (16, 16) and 0.0 < c.low < c.high < 1.0 and c.info["corrupted_patches"] > 0


def test_from_pretrained_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PatchQualityEstimator.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        PatchQualityEstimator.from_pretrained(tmp_path / "empty")
