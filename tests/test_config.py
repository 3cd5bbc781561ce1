"""Tests of the typed training config: shipped configs, error messages naming keys, overrides, DeepSpeed JSONs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from patchdpo_fast.config import (
    ConfigError,
    TrainConfig,
    config_to_dict,
    dump_config,
    load_config,
    resolve_deepspeed_config,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
SDXL = REPO / "configs" / "sdxl_ipadapter_plus.yaml"
DS_FILES = ["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"]


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Relative paths in configs are resolved against the working directory: the repository root."""
    monkeypatch.chdir(REPO)
    return REPO


def write_yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_tiny_config_validates_with_path_checks(in_repo: Path) -> None:
    cfg = load_config(TINY)
    assert cfg.model.tiny and cfg.data.source == "procedural"
    assert cfg.data.resolution == 64 and cfg.data.pairs_per_batch == 2 and cfg.data.map_size == 8
    assert cfg.train.max_steps <= 100
    assert cfg.loss.type in ("patch_dpo", "patch_weighted_mse")
    assert not cfg.deepspeed.enabled


SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_are_all_checked() -> None:
    names = {p.name for p in SHIPPED}
    assert {"tiny_cpu.yaml", "sdxl_ipadapter_plus.yaml", "sd15_ipadapter_plus.yaml"} <= names, names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path: Path, in_repo: Path) -> None:
    """Every YAML in configs/ validates (weights are not here: paths of pretrained models are not checked, but every
    path inside the repository is) and its DeepSpeed JSON resolves for 8 ranks."""
    cfg = load_config(path, check_paths=False)
    assert load_config(path, check_paths=False) == TrainConfig.model_validate(config_to_dict(cfg))
    if cfg.model.tiny:
        load_config(path)  # nothing outside the repository: every path checked
    if cfg.deepspeed.enabled:
        assert resolve_deepspeed_config(cfg, world_size=8)["train_batch_size"] == 8 * cfg.data.pairs_per_batch * (
            cfg.train.gradient_accumulation_steps
        )
    for key in ("ip_adapter_path", "image_encoder_path", "pretrained_path"):  # real-scale recipes: local weights
        value = getattr(cfg.model, key)
        assert value is None or not value.is_absolute(), (key, value)


def test_sd15_config_validates_without_weights(in_repo: Path) -> None:
    cfg = load_config(REPO / "configs" / "sd15_ipadapter_plus.yaml", check_paths=False)
    assert not cfg.model.tiny and cfg.model.trainable == "ip_adapter"
    assert cfg.model.pretrained_path == Path("pretrained/stable-diffusion-v1-5")
    assert cfg.model.ip_adapter_path == Path("pretrained/IP-Adapter/models/ip-adapter-plus_sd15.bin")
    assert cfg.data.resolution == 512 and cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.model.prediction_type is None  # the target follows the scheduler config of the model


def test_tiny_architecture_is_for_the_tiny_model_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.tiny_architecture"):
        load_config(SDXL, ["model.tiny_architecture=sd15"], check_paths=False)
    with pytest.raises(ConfigError, match=r"model\.tiny_architecture"):
        load_config(TINY, ["model.tiny_architecture=sd21"], check_paths=False)
    with pytest.raises(ConfigError, match=r"model\.prediction_type"):
        load_config(TINY, ["model.prediction_type=sample"], check_paths=False)


def test_sdxl_config_validates_without_weights(in_repo: Path) -> None:
    cfg = load_config(SDXL, check_paths=False)
    assert not cfg.model.tiny and cfg.model.gradient_checkpointing
    assert cfg.model.pretrained_path == Path("pretrained/RealVisXL_V1.0")
    assert cfg.data.resolution == 512 and cfg.data.pairs_per_batch == 4
    assert cfg.optim.optimizer == "adamw" and cfg.optim.lr == pytest.approx(3e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(0.01)
    assert cfg.train.max_steps == 30000 and cfg.train.mixed_precision == "bf16"
    assert cfg.loss.type == "patch_weighted_mse" and cfg.loss.effective_weight_mode == "quality"
    assert cfg.cache.enabled
    assert cfg.deepspeed.config == Path("configs/deepspeed/zero2.json")
    assert resolve_deepspeed_config(cfg, world_size=8)["zero_optimization"]["stage"] == 2


def test_sdxl_config_path_check_names_key_and_path(in_repo: Path) -> None:
    if (REPO / "pretrained" / "RealVisXL_V1.0").exists():
        pytest.skip("the SDXL weights are present")
    with pytest.raises(ConfigError) as info:
        load_config(SDXL)
    assert "model.pretrained_path" in info.value.keys
    assert "pretrained/RealVisXL_V1.0" in str(info.value)
    assert "deepspeed.config" not in info.value.keys  # the shipped JSON exists


def test_defaults_are_the_tiny_demo() -> None:
    cfg = load_config(None)
    assert cfg == TrainConfig()
    assert cfg.model.num_ip_tokens == 16 and cfg.loss.beta == 5000.0
    assert (cfg.data.drop_image, cfg.data.drop_text, cfg.data.drop_both) == (0.05, 0.05, 0.05)


def test_unknown_key_is_named_with_suggestion(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"train": {"max_stepz": 3}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.keys == ["train.max_stepz"]
    assert "train.max_steps" in str(info.value) and str(path) in str(info.value)


def test_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, {"optimiser": {"lr": 1.0}}))
    assert info.value.keys == ["optimiser"]


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"train": {"max_steps": "many"}}, "train.max_steps"),
        ({"optim": {"lr": [1, 2]}}, "optim.lr"),
        ({"optim": {"betas": [0.9]}}, "optim.betas"),
        ({"loss": {"type": "hinge"}}, "loss.type"),
        ({"data": {"procedural": {"num_pairs": 0}}}, "data.procedural.num_pairs"),
        ({"model": {"tiny": "perhaps"}}, "model.tiny"),
        ({"data": {"drop_text": 1.5}}, "data.drop_text"),
    ],
)
def test_wrong_type_or_value_names_key(tmp_path: Path, data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, data))
    assert [k for k in info.value.keys if k == key or k.startswith(key + ".")]  # e.g. optim.betas.1
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.tiny=false"], "model.pretrained_path"),
        (["model.pretrained_path=/somewhere"], "model.pretrained_path"),
        (["data.source=manifest"], "data.manifest_path"),
        (["data.resolution=60"], "data.resolution"),
        (["data.drop_image=0.5", "data.drop_text=0.5", "data.drop_both=0.5"], "data.drop_both"),
        (["loss.type=mse", "loss.weight_mode=quality"], "loss.weight_mode"),
        (["deepspeed.zero_stage=2", "deepspeed.offload_param=true"], "deepspeed.offload_param"),
        (["optim.optimizer=adamw8bit", "deepspeed.offload_optimizer=true"], "optim.optimizer"),
    ],
)
def test_cross_field_errors_name_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert key in info.value.keys


def test_missing_paths_fail_at_load_naming_key_and_path(tmp_path: Path) -> None:
    encoder = tmp_path / "image_encoder"
    encoder.mkdir()
    data = {
        "model": {
            "tiny": False,
            "pretrained_path": str(tmp_path / "no_such_sdxl"),
            "image_encoder_path": str(encoder),
            "ip_adapter_path": str(tmp_path / "missing.bin"),
        },
        "deepspeed": {"config": str(tmp_path / "ds.json")},
    }
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, data))
    assert info.value.keys == ["model.pretrained_path", "model.ip_adapter_path", "deepspeed.config"]
    message = str(info.value)
    assert str(tmp_path / "no_such_sdxl") in message and str(tmp_path / "missing.bin") in message
    # Without path checks the same config is valid.
    assert load_config(write_yaml(tmp_path, data), check_paths=False).model.image_encoder_path == encoder


def test_path_of_wrong_kind_and_bad_deepspeed_json(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text("{not json")
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"deepspeed.config={tmp_path / 'ds.json'}"])
    assert info.value.keys == ["deepspeed.config"]
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"model.ip_adapter_path={tmp_path}"])
    assert info.value.keys == ["model.ip_adapter_path"] and "directory" in str(info.value)


def test_overrides_nested_and_coerced() -> None:
    cfg = load_config(
        TINY,
        [
            "data.procedural.num_pairs=5",
            "optim.lr=1e-3",
            "optim.betas=[0.8, 0.95]",
            "train.keep_checkpoints=null",
            "train.output_dir=/tmp/run",
            "model.gradient_checkpointing=true",
            "optim.max_grad_norm=2",
            "train.resume_from=latest",
        ],
    )
    assert cfg.data.procedural.num_pairs == 5
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.train.keep_checkpoints is None
    assert cfg.train.output_dir == Path("/tmp/run")
    assert cfg.model.gradient_checkpointing is True
    assert cfg.optim.max_grad_norm == 2.0 and isinstance(cfg.optim.max_grad_norm, float)
    assert cfg.train.resume_from == "latest"


def test_override_creates_missing_section() -> None:
    assert load_config(None, ["cache.enabled=true"]).cache.enabled


@pytest.mark.parametrize(
    ("override", "key", "text"),
    [
        ("train.max_stepz=3", "train.max_stepz", "did you mean 'train.max_steps'"),
        ("trian.max_steps=3", "trian.max_steps", "did you mean 'train'"),
        ("train.max_steps.x=3", "train.max_steps.x", "not a section"),
        ("train.max_steps", "train.max_steps", "section.key=value"),
        ("train.max_steps=lots", "train.max_steps", "valid integer"),
    ],
)
def test_bad_override_fails_clearly(override: str, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert info.value.keys == [key]
    assert text in str(info.value)


def test_yaml_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_empty_section_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("deepspeed:\n  # config: configs/deepspeed/zero2.json\ncache:\n")
    assert load_config(path) == TrainConfig()


def test_yaml_exponent_floats(tmp_path: Path) -> None:
    path = tmp_path / "lr.yaml"
    path.write_text("optim:\n  lr: 3e-5\n  eps: 1E-6\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 3e-5 and cfg.optim.eps == 1e-6


def test_dump_round_trip(tmp_path: Path, in_repo: Path) -> None:
    for source in (TINY, SDXL):
        cfg = load_config(source, ["optim.lr=2e-5"], check_paths=False)
        text = dump_config(cfg, tmp_path / "saved" / "config.yaml")
        assert (tmp_path / "saved" / "config.yaml").read_text() == text
        assert load_config(tmp_path / "saved" / "config.yaml", check_paths=False) == cfg
        json.dumps(config_to_dict(cfg))  # plain data


@pytest.mark.parametrize("name", DS_FILES)
def test_deepspeed_jsons_resolve(in_repo: Path, name: str) -> None:
    raw = json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())
    assert raw["train_micro_batch_size_per_gpu"] == "auto"
    cfg = load_config(SDXL, [f"deepspeed.config=configs/deepspeed/{name}.json"], check_paths=False)
    conf = resolve_deepspeed_config(cfg, world_size=8)
    assert "auto" not in json.dumps(conf)
    assert conf["train_micro_batch_size_per_gpu"] == 4 and conf["train_batch_size"] == 32
    assert conf["gradient_accumulation_steps"] == 1 and conf["gradient_clipping"] == 1.0
    assert conf["bf16"]["enabled"] is True and conf["fp16"]["enabled"] is False
    zero = conf["zero_optimization"]
    assert zero["stage"] == int(name[4])
    offload = name.endswith("offload")
    assert ("offload_optimizer" in zero) == offload and ("optimizer" in conf) == offload
    if offload:
        assert conf["optimizer"]["params"]["lr"] == pytest.approx(3e-5)
        assert conf["optimizer"]["params"]["betas"] == [0.9, 0.999]


def test_deepspeed_overrides_and_mismatch(in_repo: Path, tmp_path: Path) -> None:
    cfg = load_config(
        SDXL,
        ["deepspeed.zero_stage=3", "deepspeed.offload_param=true", "train.mixed_precision=fp16",
         "train.gradient_accumulation_steps=2", "optim.max_grad_norm=null"],
        check_paths=False,
    )  # fmt: skip
    conf = resolve_deepspeed_config(cfg, world_size=2)
    assert conf["zero_optimization"]["stage"] == 3 and conf["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert conf["fp16"]["enabled"] is True and conf["bf16"]["enabled"] is False
    assert conf["train_batch_size"] == 4 * 2 * 2 and conf["gradient_clipping"] == 0.0

    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1}}))
    cfg = load_config(SDXL, [f"deepspeed.config={fixed}"], check_paths=False)
    with pytest.raises(ConfigError) as info:
        resolve_deepspeed_config(cfg, world_size=1)
    assert info.value.keys == ["deepspeed.config"] and "train_micro_batch_size_per_gpu" in str(info.value)

    assert resolve_deepspeed_config(load_config(TINY), world_size=1) is None
    conf = resolve_deepspeed_config(load_config(TINY, ["deepspeed.zero_stage=1"]), world_size=1)
    assert conf["zero_optimization"]["stage"] == 1 and conf["train_batch_size"] == 2


def test_deepspeed_accepts_resolved_configs(in_repo: Path) -> None:
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    for name in DS_FILES:
        cfg = load_config(SDXL, [f"deepspeed.config=configs/deepspeed/{name}.json"], check_paths=False)
        parsed = ds_config.DeepSpeedConfig(resolve_deepspeed_config(cfg, world_size=1))
        assert parsed.zero_optimization_stage == int(name[4])
        assert parsed.train_micro_batch_size_per_gpu == 4


def test_manifest_data_options(tmp_path: Path) -> None:
    cfg = load_config(None)
    assert (cfg.data.validate_files, cfg.data.missing_maps, cfg.data.uniform_quality) == ("quick", "error", 0.0)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"format": "patchdpo-manifest", "version": 1}\n')
    cfg = load_config(
        None,
        [
            "data.source=manifest",
            f"data.manifest_path={manifest}",
            "data.missing_maps=uniform",
            "data.uniform_quality=0.5",
            "data.validate_files=full",
        ],
    )
    assert cfg.data.manifest_path == manifest and cfg.data.missing_maps == "uniform"
    assert cfg.data.uniform_quality == 0.5 and cfg.data.validate_files == "full"
    for override, key in (
        ("data.missing_maps=ignore", "data.missing_maps"),
        ("data.uniform_quality=1.5", "data.uniform_quality"),
        ("data.validate_files=deep", "data.validate_files"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        assert info.value.keys == [key]
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.source=manifest", f"data.manifest_path={tmp_path / 'none.jsonl'}"])
    assert info.value.keys == ["data.manifest_path"]


def _literal_fields(model: type = TrainConfig, prefix: str = "") -> list[tuple[str, tuple]]:
    """Every ``Literal``-typed config key (dotted) with its allowed values."""
    import typing

    from pydantic import BaseModel

    found = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _literal_fields(annotation, f"{key}.")
        elif typing.get_origin(annotation) is typing.Literal:
            found.append((key, typing.get_args(annotation)))
    return found


def test_overrides_accept_every_documented_value_as_written(tmp_path: Path) -> None:
    """`--set train.mixed_precision=no` once read as the YAML 1.1 boolean False and was rejected."""
    literal_fields = _literal_fields()
    assert ("train.mixed_precision", ("no", "fp16", "bf16")) in literal_fields
    for key, values in literal_fields:
        section, _, name = key.rpartition(".")
        for value in values:
            extra = ["data.manifest_path=m.jsonl"] if key == "data.source" else []
            if key == "model.base_architecture":  # a pretrained model's setting (the tiny one has its own)
                extra = ["model.tiny=false", "model.pretrained_path=base", "model.image_encoder_path=image"]
            cfg = load_config(None, [f"{key}={value}", *extra], check_paths=False)
            node = cfg
            for part in section.split("."):
                node = getattr(node, part)
            assert getattr(node, name) == value, key
    # the same words unquoted in a YAML file
    path = write_yaml(tmp_path, {})
    path.write_text("train:\n  mixed_precision: no\n  export_dtype: fp32\nmodel:\n  gradient_checkpointing: true\n")
    cfg = load_config(path, check_paths=False)
    assert cfg.train.mixed_precision == "no" and cfg.train.export_dtype == "fp32" and cfg.model.gradient_checkpointing
    # booleans are written true/false; pydantic still reads yes/no for a bool field
    assert load_config(None, ["model.gradient_checkpointing=yes"], check_paths=False).model.gradient_checkpointing
    assert not load_config(
        None, ["model.tiny_seed=0", "model.xformers_fallback=no"], check_paths=False
    ).model.xformers_fallback
    with pytest.raises(ConfigError, match=r"train\.mixed_precision"):
        load_config(None, ["train.mixed_precision=true"], check_paths=False)


def test_sdxl_unet_lora_dpo_config_is_the_diffusion_dpo_recipe(in_repo: Path) -> None:
    cfg = load_config(REPO / "configs" / "sdxl_unet_lora_dpo.yaml", check_paths=False)
    assert cfg.model.trainable == "unet_lora" and not cfg.model.use_ip_adapter
    assert cfg.model.image_encoder_path is None and cfg.model.ip_adapter_path is None
    assert cfg.loss.type == "diffusion_dpo" and cfg.loss.beta == 5000.0 and cfg.loss.effective_weight_mode == "uniform"
    assert cfg.optim.lr == pytest.approx(1e-5) and cfg.optim.lr_schedule == "constant" and cfg.optim.warmup_steps == 0
    assert cfg.train.max_steps == 2000 and cfg.data.pairs_per_batch * cfg.train.gradient_accumulation_steps == 16
    assert cfg.model.lora.rank == 8 and cfg.model.lora.effective_alpha == 8.0
    assert cfg.data.missing_maps == "uniform" and cfg.data.drop_text == 0.0
