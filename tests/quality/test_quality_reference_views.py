"""Reference views (:mod:`patchdpo_fast.quality.reference_views`): the windows, their pixels and candidate masks, and
the estimator and raw-pixel baseline matching against them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from patchdpo_fast.quality import PatchQualityEstimator
from patchdpo_fast.quality.baseline import RawPixelMatcher
from patchdpo_fast.quality.reference_views import ReferenceViews, view_images, view_masks

VIEWS = ReferenceViews(scales=(1.0, 1.2), crops=3, shift=0.5)


def test_windows_of_the_default_views():
    wins = VIEWS.windows((128, 128), (8, 8))
    # the reference itself first, then the three half-patch shifts, then 3 x 3 windows over the 154 px upscaled image
    assert wins[:4] == [(1.0, 0, 0), (1.0, -4, 0), (1.0, 0, -4), (1.0, -4, -4)]
    assert wins[4:] == [(1.2, y, x) for y in (0, 13, 26) for x in (0, 13, 26)]
    assert ReferenceViews().windows((128, 128), (8, 8)) == [(1.0, 0, 0)] and ReferenceViews().is_identity
    # the generated image's views for the reference side: the reciprocal scale in one centred, padded window
    inverse = VIEWS.inverse()
    assert inverse.scales == (1.0, 1 / 1.2) and inverse.shift == 0.5 and inverse.inverse() == VIEWS
    assert inverse.windows((256, 256), (16, 16)) == [(1.0, 0, 0), (1.0, -8, 0), (1.0, 0, -8), (1.0, -8, -8),
                                                     (1 / 1.2, -22, -22)]  # fmt: skip
    # a scale below 1 is one centred window reaching past the smaller image; one crop is the centre one
    assert ReferenceViews(scales=(1.0, 0.75)).windows((128, 96), (8, 8)) == [(1.0, 0, 0), (0.75, -16, -12)]
    assert ReferenceViews(scales=(1.0, 1.5), crops=1).windows((64, 64), (8, 8)) == [(1.0, 0, 0), (1.5, 16, 16)]
    # non-square images and patches: the shift is per axis
    assert ReferenceViews(shift=0.5).windows((64, 32), (8, 4))[1:] == [(1.0, -4, 0), (1.0, 0, -2), (1.0, -4, -2)]


def test_view_pixels():
    x = torch.rand(2, 3, 32, 40)
    views = view_images(x, VIEWS, (8, 8))
    assert len(views) == 13 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x)
    # shifted down by 4 rows: the top rows repeat the first row
    torch.testing.assert_close(views[1][..., 4:, :], x[..., :-4, :])
    torch.testing.assert_close(views[1][..., :4, :], x[..., :1, :].expand(-1, -1, 4, -1))
    torch.testing.assert_close(views[2][..., :, 4:], x[..., :, :-4])
    # the last window of scale 1.2 is the bottom-right corner of the upscaled image
    big = F.interpolate(x, size=(38, 48), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(views[-1], big[..., 6:, 8:])
    torch.testing.assert_close(views[4], big[..., :32, :40])
    # the normalization commutes with the views (the estimator applies them to normalized pixels)
    for a, b in zip(view_images(2.0 * x - 0.3, VIEWS, (8, 8)), views, strict=True):
        torch.testing.assert_close(a, 2.0 * b - 0.3)


def test_candidate_masks():
    cand = view_masks(VIEWS, (128, 128), (16, 16), batch=2)
    assert cand.shape == (2, 13, 16, 16) and cand.dtype == torch.bool
    assert cand[:, 0].all() and cand[:, 4:].all()  # the reference and windows inside the upscaled image
    # half a patch of padding leaves half of the edge cells inside: still candidates; three quarters do not
    assert cand[:, 1].all()
    wide = view_masks(ReferenceViews(shift=0.75), (128, 128), (16, 16))
    assert not wide[0, 1, 0].any() and wide[0, 1, 1:].all() and not wide[0, 3, :, 0].any()
    small = view_masks(ReferenceViews(scales=(1.0, 0.5)), (128, 128), (16, 16))[0, 1]
    assert small[4:12, 4:12].all() and int(small.sum()) == 64  # the half-size image sits in the middle 8 x 8 cells
    # with a foreground mask a cell needs its coverage too
    mask = torch.zeros(2, 1, 128, 128)
    mask[:, :, :, :64] = 1.0
    masked = view_masks(VIEWS, (128, 128), (16, 16), mask=mask, threshold=0.5)
    assert masked[:, 0, :, :8].all() and not masked[:, 0, :, 8:].any()
    assert masked[:, 2, :, :8].all() and not masked[:, 2, :, 9:].any()  # shifted right by half a cell: 8.5 cells


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scales": (1.2,)}, "must contain 1.0"),
        ({"scales": (1.0, 3.0)}, r"distinct values in \[0.5, 2\]"),
        ({"scales": (1.0, 1.0)}, "distinct"),
        ({"crops": 0}, r"`crops` must be an integer in \[1, 5\]"),
        ({"shift": 1.0}, r"`shift` must be in \[0, 1\)"),
    ],
)
def test_bad_views_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReferenceViews(**kwargs)


def test_views_from_dicts_and_strings():
    assert ReferenceViews.from_any(VIEWS.to_dict()) == VIEWS and ReferenceViews.from_any(None).is_identity
    assert ReferenceViews().replaced("1,1.2", 3, 0.5) == VIEWS
    assert VIEWS.replaced("1") == ReferenceViews(scales=(1.0,), crops=3, shift=0.5)
    with pytest.raises(ValueError, match="unknown keys"):
        ReferenceViews.from_any({"scales": [1.0], "zoom": 2})
    with pytest.raises(ValueError, match="comma-separated numbers"):
        VIEWS.replaced("1,big")
    with pytest.raises(ValueError, match="must be a ReferenceViews"):
        ReferenceViews.from_any([1.0, 1.2])


@pytest.fixture(scope="module")
def viewing(tiny_estimator):
    """The tiny estimator's backbone with the default views."""
    return PatchQualityEstimator(tiny_estimator.backbone, reference_views=VIEWS)


def test_a_generated_view_of_the_reference_is_matched_exactly(tiny_estimator, viewing, photos):
    # the tiny ViT sees 256 px (16 px patches): views of a reference of that size are what it matches against
    assert viewing.image_size == (256, 256)
    ref = F.interpolate(photos[:2], size=(256, 256), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    cand = view_masks(VIEWS, (256, 256), (16, 16))[0]
    for k in (1, 3, 7, 12):  # a half-patch shift, both shifts, windows of the 1.2 x reference
        gen = view_images(ref, VIEWS, (16, 16))[k].clamp(0.0, 1.0)
        with_views = viewing.estimate(ref, gen)
        # every cell that is a candidate in view k finds itself (the corner cell of view 3 is 3/4 padding: not one)
        sim = with_views.generated_similarity[:, cand[k]]
        torch.testing.assert_close(sim, torch.ones_like(sim), atol=1e-4, rtol=0)
        plain = tiny_estimator.estimate(ref, gen).generated_similarity
        assert plain.mean() < 0.99 and (with_views.generated_similarity >= plain - 1e-5).all()
        # the reference side matches against the generated image's views: never worse than the plain match
        assert (with_views.reference_similarity >= tiny_estimator.estimate(ref, gen).reference_similarity - 1e-5).all()
    # half a patch down, and half a patch more in the generated image's shifted view: reference rows 0-14 are there,
    # a whole patch lower (the features see the context and the position, so nearly, not exactly, the same)
    gen = view_images(ref, VIEWS, (16, 16))[1]
    sim_ref = viewing.estimate(ref, gen).reference_similarity[:, :15]
    plain = tiny_estimator.estimate(ref, gen).reference_similarity[:, :15]
    assert sim_ref.mean() > 0.995 and plain.mean() < 0.97
    # the reference against itself is still perfect, and one reference serves many generated images
    torch.testing.assert_close(viewing.estimate(ref, ref).generated, torch.ones(2, 16, 16), atol=1e-4, rtol=0)
    many = viewing.estimate(ref[:1], photos[:3])
    torch.testing.assert_close(many.generated[1], viewing.estimate(ref[:1], photos[1:2]).generated[0])


def test_a_repeated_reference_is_seen_once(viewing, photos, monkeypatch):
    refs = photos[[0, 1, 0, 0]]  # one subject photo for three of the four generated images
    gens = photos[[1, 2, 3, 2]].flip(-1)
    seen: list[int] = []
    forward = PatchQualityEstimator.features_from_pixels

    def counting(self, pixels):
        seen.append(pixels.shape[0])
        return forward(self, pixels)

    monkeypatch.setattr(PatchQualityEstimator, "features_from_pixels", counting)
    maps = viewing.estimate(refs, gens)
    # 13 views of the 2 distinct references, the 4 generated images and their 4 extra views each
    assert sum(seen) == 13 * 2 + 4 + 4 * 4
    for i in range(4):
        one = viewing.estimate(refs[i : i + 1], gens[i : i + 1])
        torch.testing.assert_close(maps.generated_similarity[i], one.generated_similarity[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(maps.reference_similarity[i], one.reference_similarity[0], atol=1e-5, rtol=0)


def test_views_keep_the_reference_mask(tiny_estimator, viewing, photos):
    mask = torch.zeros(2, 128, 128)
    mask[:, :, :64] = 1.0
    maps = viewing.estimate(photos[:2], photos[:2], reference_mask=mask)
    # the shifted and scaled views do not bring the background back as candidates
    assert (maps.generated_similarity[:, :, :7] > 0.9999).all()
    assert (maps.generated_similarity[:, :, 9:] < 0.9999).all()
    torch.testing.assert_close(
        maps.reference, tiny_estimator.estimate(photos[:2], photos[:2], reference_mask=mask).reference
    )
    # one mask for one reference and many generated images
    one = viewing.estimate(photos[:1], photos[:2], reference_mask=mask[:1])
    torch.testing.assert_close(one.generated[0], maps.generated[0])


def test_views_are_saved_and_loaded(tmp_path, viewing, tiny_estimator):
    folder = viewing.save_pretrained(tmp_path / "est")
    cfg = json.loads((folder / "quality_config.json").read_text())
    assert cfg["reference_views"] == {"scales": [1.0, 1.2], "crops": 3, "shift": 0.5}
    assert PatchQualityEstimator.from_pretrained(folder).reference_views == VIEWS
    # an estimator without views writes no key (its settings, and map tags, stay as before)
    assert "reference_views" not in tiny_estimator.config_dict()
    assert PatchQualityEstimator.from_pretrained(folder, reference_views=None).reference_views.is_identity


def test_raw_pixel_baseline_with_views(photos):
    ref = photos[:2]
    gen = view_images(ref, VIEWS, (8, 8))[1]  # shifted down by half a 8 px cell
    plain = RawPixelMatcher((16, 16), patch_px=8).estimate(ref, gen).generated_similarity
    raw = RawPixelMatcher((16, 16), patch_px=8, reference_views=VIEWS)
    viewed = raw.estimate(ref, gen).generated_similarity
    torch.testing.assert_close(viewed, torch.ones(2, 16, 16), atol=1e-5, rtol=0)
    assert plain.mean() < 0.99
    assert raw.config_dict()["reference_views"] == VIEWS.to_dict()
    # the reference side against the generated image's views: reference rows 0-14 are in its shifted view
    ref_side = raw.estimate(ref, gen).reference_similarity
    torch.testing.assert_close(ref_side[:, :15], torch.ones(2, 15, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(raw.estimate(ref[:1], gen).generated_similarity[0], viewed[0])
