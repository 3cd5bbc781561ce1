"""The input-cache fingerprint holds exactly what the cached tensors depend on, and a stale cache names the change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from patchdpo_fast.config import load_config
from patchdpo_fast.data.cache import CacheError, describe_changes
from patchdpo_fast.data.cache_settings import input_cache_fingerprint
from patchdpo_fast.train import train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"

BASE = ["data.procedural.num_pairs=4", "cache.shard_size=16"]

#: settings the cached latents / embeddings / features / maps do not depend on: the cache stays valid
SAME = [
    "model.gradient_checkpointing=true",
    "model.attention_backend=eager",
    "model.xformers_fallback=false",
    "model.ip_scale=0.5",
    "model.num_ip_tokens=4",
    "model.train_resampler=true",
    "loss.type=diffusion_dpo",
    "loss.beta=100",
    "optim.optimizer=adamw8bit",
    "optim.lr=1e-3",
    "train.max_steps=7",
    "train.gradient_accumulation_steps=2",
    "train.export_dtype=fp32",
    "cache.encode_batch_size=2",
    "cache.on_stale=error",
    "data.pairs_per_batch=1",
    "data.drop_image=0.2",
    "deepspeed.zero_stage=2",
]

#: settings the cache depends on, with the fingerprint key a change must name
CHANGED = [
    ("train.mixed_precision=bf16", "encoders.text_encoder.dtype"),
    ("train.mixed_precision=fp16", "encoders.image_encoder.dtype"),
    ("model.tiny_seed=1", "encoders.vae.weights.tiny_seed"),
    ("data.resolution=128", "encoders.resolution"),
    ("data.patch_size=16", "dataset.patch_size"),
    ("data.procedural.seed=1", "dataset.seed"),
    ("data.procedural.num_pairs=8", "dataset.num_pairs"),
    ("cache.dtype=float16", "dtype"),
    ("cache.shard_size=4", "shard_size"),
]


def _fingerprint(*overrides: str) -> tuple[str, dict]:
    return input_cache_fingerprint(load_config(TINY, [*BASE, *overrides], check_paths=False))


@pytest.mark.parametrize("override", SAME)
def test_settings_the_cache_does_not_depend_on_leave_it_valid(override: str) -> None:
    base, described = _fingerprint()
    new, new_described = _fingerprint(override)
    assert new == base, f"{override} changed the cache fingerprint: {describe_changes(described, new_described)}"


@pytest.mark.parametrize(("override", "key"), CHANGED)
def test_settings_the_cache_depends_on_change_it_and_are_named(override: str, key: str) -> None:
    base, described = _fingerprint()
    new, new_described = _fingerprint(override)
    assert new != base, f"{override} must invalidate the cache"
    changes = describe_changes(described, new_described)
    assert any(line.startswith(f"{key}:") for line in changes), changes


def _fake_pretrained(root: Path) -> tuple[Path, Path]:
    sdxl = root / "sdxl"
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        (sdxl / sub).mkdir(parents=True)
        (sdxl / sub / "config.json").write_text("{}")
        (sdxl / sub / "model.safetensors").write_bytes(b"weights of " + sub.encode())
    image = root / "image_encoder"
    image.mkdir()
    (image / "config.json").write_text("{}")
    (image / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5]}')
    (image / "model.safetensors").write_bytes(b"vit-h")
    return sdxl, image


def test_pretrained_encoder_weights_are_in_the_fingerprint_and_the_unet_is_not(tmp_path: Path) -> None:
    sdxl, image = _fake_pretrained(tmp_path)
    overrides = ["model.tiny=false", f"model.pretrained_path={sdxl}", f"model.image_encoder_path={image}"]
    base, described = _fingerprint(*overrides)

    def touched(path: Path, data: bytes) -> tuple[str, dict]:
        old = path.read_bytes()
        stat = path.stat()
        path.write_bytes(data)
        try:
            return _fingerprint(*overrides)
        finally:
            path.write_bytes(old)
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    for sub in ("unet", "scheduler"):  # the cache holds no UNet or scheduler output
        assert touched(sdxl / sub / "model.safetensors", b"finetuned")[0] == base
    for path, key in (
        (sdxl / "text_encoder_2" / "model.safetensors", "encoders.text_encoder_2.weights.files.model.safetensors"),
        (sdxl / "vae" / "model.safetensors", "encoders.vae.weights.files.model.safetensors"),
        (sdxl / "tokenizer" / "config.json", "encoders.text_encoder.tokenizer.files.config.json"),
        (image / "preprocessor_config.json", "encoders.image_encoder.weights.files.preprocessor_config.json"),
    ):
        new, new_described = touched(path, b"something else entirely")
        assert new != base, path
        assert any(line.startswith(key) for line in describe_changes(described, new_described)), path
    assert _fingerprint(*overrides)[0] == base  # everything restored: valid again


def test_training_reuses_the_cache_across_unrelated_settings_and_names_a_dtype_change(tmp_path: Path) -> None:
    def cfg(name: str, *overrides: str):
        return load_config(TINY, [*BASE, f"train.output_dir={tmp_path / name}", f"cache.dir={tmp_path / 'cache'}",
                                  "cache.on_stale=error", "train.max_steps=1", *overrides])  # fmt: skip

    train(cfg("a"))
    index = (tmp_path / "cache" / "index.json").read_text()
    # gradient checkpointing changes nothing the cache holds: the same cache serves the run
    assert train(cfg("b", "model.gradient_checkpointing=true")).final_step == 1
    assert (tmp_path / "cache" / "index.json").read_text() == index
    # encoders in bf16 would have produced other features: the fp32 cache is refused, naming the setting
    with pytest.raises(CacheError, match=r'encoders\.text_encoder\.dtype: "float32" -> "bfloat16"'):
        train(cfg("c", "train.mixed_precision=bf16"))
