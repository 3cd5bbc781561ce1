"""DINO / CLIP-I / CLIP-T scores with tiny random models: identities, ordering, and the averaging of the protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from patchdpo_fast.eval.evaluate import evaluate_dreambench
from patchdpo_fast.eval.metrics import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop,
    embed_clip_images,
    embed_clip_texts,
    embed_dino,
    preprocess,
    resize_shorter,
    subject_scores,
)


def test_preprocessing_follows_torchvision(tmp_path) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (301, 200, 3), dtype=np.uint8))  # w=200, h=301
    resized = resize_shorter(img, 256)
    assert resized.size == (256, int(256 * 301 / 200))  # torchvision: long side truncated
    assert resize_shorter(resized, 256) is resized  # already the size: untouched
    cropped = center_crop(resized, 224)
    top, left = round((resized.height - 224) / 2), round((resized.width - 224) / 2)
    assert np.array_equal(np.asarray(cropped), np.asarray(resized)[top : top + 224, left : left + 224])
    small = center_crop(Image.new("RGB", (100, 50), "white"), 224)  # padded with zeros like torchvision
    assert small.size == (224, 224) and small.getpixel((0, 0)) == (0, 0, 0) and small.getpixel((112, 112)) == (255,) * 3

    path = tmp_path / "img.png"
    img.save(path)
    x = preprocess(path, 256, 224, IMAGENET_MEAN, IMAGENET_STD)
    expected = (np.asarray(cropped, np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    torch.testing.assert_close(x, torch.from_numpy(expected.transpose(2, 0, 1)).float())


def test_subject_score_is_mean_of_similarity_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    gen, ref, gen_c, ref_c, txt = (torch.randn(n, 8, generator=g) for n in (4, 3, 4, 3, 4))
    scores = subject_scores(gen, ref, gen_c, ref_c, txt)

    def cos(a, b):
        a, b = a.double().numpy(), b.double().numpy()
        return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T

    assert scores["dino"] == pytest.approx(cos(gen, ref).mean(), abs=1e-6)
    assert scores["clip_i"] == pytest.approx(cos(gen_c, ref_c).mean(), abs=1e-6)
    assert scores["clip_t"] == pytest.approx(np.diag(cos(gen_c, txt)).mean(), abs=1e-6)
    assert scores["per_image"]["dino"] == pytest.approx(cos(gen, ref).mean(1), abs=1e-6)
    with pytest.raises(ValueError, match="prompts"):
        subject_scores(gen, ref, gen_c, ref_c, txt[:2])


def test_identical_images_score_one(eval_models, protocol, mini, tmp_path, write_layout, photos) -> None:
    """Generated images that are the (selected) reference photo itself: DINO = CLIP-I = 1 for every subject."""
    chosen = {s: [mini / s / "02.jpg"] for s in ("backpack", "dog")}  # Kosmos-G's photo of both subjects
    root = write_layout(tmp_path / "gen", protocol, chosen, limit=3)
    result = evaluate_dreambench(
        root, mini, eval_models, setting="single", subjects=["backpack", "dog"], prompts_limit=3, protocol=protocol
    )
    assert result["selection"]["single_reference"] == {"backpack": "02", "dog": "02"}
    for key in ("dino", "clip_i"):
        assert result["overall"][key] == pytest.approx(1.0, abs=1e-5)
        for s in result["per_subject"].values():
            assert s[key] == pytest.approx(1.0, abs=1e-5) and s["num_references"] == 1 and s["num_generated"] == 3


@pytest.mark.parametrize("setting", ["single", "all"])
def test_shuffled_set_scores_lower(eval_models, protocol, mini, tmp_path, write_layout, photos, setting) -> None:
    """The same images assigned to the wrong subjects score lower, per subject and overall."""
    # "all": each subject's own photos; "single": its selected photo (02), the one reference of that setting
    own = {s: photos(s) if setting == "all" else [mini / s / "02.jpg"] for s in ("backpack", "dog")}
    matched = write_layout(tmp_path / "matched", protocol, own)
    shuffled = write_layout(tmp_path / "shuffled", protocol, {"backpack": own["dog"], "dog": own["backpack"]})
    kw = {"setting": setting, "subjects": ["backpack", "dog"], "prompts_limit": 2, "protocol": protocol}
    good = evaluate_dreambench(matched, mini, eval_models, **kw)
    bad = evaluate_dreambench(shuffled, mini, eval_models, **kw)
    for key in ("dino", "clip_i"):
        assert bad["overall"][key] < good["overall"][key]
        for subject in ("backpack", "dog"):
            assert bad["per_subject"][subject][key] < good["per_subject"][subject][key]


def test_evaluation_averages_like_the_protocol(eval_models, protocol, mini, tmp_path, write_layout, photos) -> None:
    """Per subject: the mean of the generated x reference matrix; CLIP-T against the prompt; overall: subject mean."""
    root = write_layout(
        tmp_path / "gen", protocol, {"backpack": photos("dog")[:2], "dog": photos("backpack")[1:]}, limit=3
    )
    result = evaluate_dreambench(
        root, mini, eval_models, subjects=["backpack", "dog"], prompts_limit=3, protocol=protocol, batch_size=2
    )
    for subject in ("backpack", "dog"):
        gen = [root / subject / i.file_name for i in protocol.items([subject], 3)]
        refs = photos(subject)
        prompts = protocol.prompts(subject, limit=3)
        dino = (embed_dino(eval_models, gen) @ embed_dino(eval_models, refs).T).double()
        clip_g = embed_clip_images(eval_models, gen)
        clip_i = (clip_g @ embed_clip_images(eval_models, refs).T).double()
        clip_t = (clip_g * embed_clip_texts(eval_models, prompts)).sum(-1).double()
        s = result["per_subject"][subject]
        assert dino.shape == (3, 3) and s["num_references"] == 3
        assert s["dino"] == pytest.approx(float(dino.mean()), abs=1e-6)
        assert s["clip_i"] == pytest.approx(float(clip_i.mean()), abs=1e-6)
        assert s["clip_t"] == pytest.approx(float(clip_t.mean()), abs=1e-6)
        assert list(s["per_prompt"]) == prompts
        assert [v["clip_t"] for v in s["per_prompt"].values()] == pytest.approx(clip_t.tolist(), abs=1e-6)
    for key in ("dino", "clip_i", "clip_t"):
        mean = (result["per_subject"]["backpack"][key] + result["per_subject"]["dog"][key]) / 2
        assert result["overall"][key] == pytest.approx(mean, abs=1e-12)
    assert result["complete_protocol"] is False and result["num_images"] == 6


def test_missing_references_are_listed(eval_models, protocol, references_copy, tmp_path, write_layout, photos) -> None:
    root = write_layout(tmp_path / "gen", protocol, {"backpack": photos("backpack"), "dog": photos("dog")})
    for p in (references_copy / "dog").iterdir():
        p.unlink()
    (references_copy / "backpack" / "02.jpg").unlink()
    with pytest.raises(FileNotFoundError) as info:
        evaluate_dreambench(
            root, references_copy, eval_models, setting="single", subjects=["backpack", "dog"], prompts_limit=2
        )
    assert "backpack" in str(info.value) and "dog" in str(info.value)


def test_models_load_from_local_folders(eval_models, mini, tmp_path) -> None:
    """--dino-model / --clip-model folders (transformers save_pretrained layout) give the same embeddings."""
    from patchdpo_fast.eval.metrics import build_eval_models

    eval_models.dino.save_pretrained(tmp_path / "dino")
    eval_models.clip.save_pretrained(tmp_path / "clip")
    eval_models.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = build_eval_models(dino_model=tmp_path / "dino", clip_model=tmp_path / "clip", device="cpu")
    assert loaded.identity["dino_model"] == str(tmp_path / "dino") and loaded.dtype == torch.float32
    images = [mini / "dog" / "00.jpg", mini / "backpack" / "01.jpg"]
    for embed in (embed_dino, embed_clip_images):
        torch.testing.assert_close(embed(loaded, images), embed(eval_models, images))
    torch.testing.assert_close(embed_clip_texts(loaded, ["a dog"]), embed_clip_texts(eval_models, ["a dog"]))
    half = build_eval_models(tiny=True, device="cpu", dtype=torch.bfloat16)
    torch.testing.assert_close(embed_dino(half, images), embed_dino(eval_models, images), atol=0.05, rtol=0)
    with pytest.raises(FileNotFoundError, match="nope"):
        build_eval_models(dino_model=tmp_path / "nope", clip_model=tmp_path / "clip")
    with pytest.raises(ValueError, match="tiny"):
        build_eval_models(tiny=True, dino_model=tmp_path / "dino")
