"""model.trainable beyond the adapter: a LoRA on the UNet and full UNet finetuning, with every loss.

Most tests drive the trainer's own pieces (model build, trainable setup, engine, the forward loss) on one fixed
batch for a few optimizer steps, which keeps a mode x loss grid cheap; the resume and export tests run ``train``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fixed_batch import ENV, FixedBatch, fixed_batch_cfg
from safetensors.torch import load_file

from patchdpo_fast.config import ConfigError, load_config
from patchdpo_fast.train import train
from patchdpo_fast.training.build import build_models
from patchdpo_fast.training.resume import ResumeConfigError
from patchdpo_fast.training.trainable import setup_trainable

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"
MODES = ["unet_lora", "unet", "ip_adapter+unet_lora", "ip_adapter+unet"]
LOSSES = ["patch_weighted_mse", "mse", "patch_dpo", "diffusion_dpo", "reconstruction"]
# per loss: a learning rate (and beta) under which a few steps on one batch move a random tiny model
LEARN = {
    "patch_weighted_mse": ["optim.lr=1e-3"],
    "mse": ["optim.lr=1e-3"],
    "reconstruction": ["optim.lr=1e-3"],
    "patch_dpo": ["optim.lr=1e-3", "loss.beta=1000"],
    "diffusion_dpo": ["optim.lr=1e-3", "loss.beta=200"],
}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_every_loss_falls_in_every_mode(mode, loss):
    run = FixedBatch(fixed_batch_cfg(f"model.trainable={mode}", f"loss.type={loss}", *LEARN[loss]))
    start = float(run.loss().loss)
    if loss.endswith("dpo"):  # policy == reference at step 0: the LoRA starts at zero, the reference is a copy
        assert start == pytest.approx(0.6931471805599453, abs=1e-6)
    run.step(3)
    end = float(run.loss().loss)
    assert end < start, (start, end)


@pytest.mark.parametrize("mode", ["unet", "ip_adapter+unet"])
def test_full_finetuning_keeps_a_frozen_reference_only_for_dpo_losses(mode):
    run = FixedBatch(fixed_batch_cfg(f"model.trainable={mode}", "loss.type=patch_dpo", *LEARN["patch_dpo"]))
    ref = run.engine.reference
    assert ref is not None and ref is not run.models.ip_unet
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    assert not run.models.ip_unet.has_reference  # the copy holds the initial adapter: no second adapter copy
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    policy_before = run.models.ip_unet.unet_state_dict()["conv_in.weight"].clone()
    run.step(2)
    after = ref.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the reference did not move
    assert not torch.equal(run.models.ip_unet.unet_state_dict()["conv_in.weight"], policy_before)  # the policy did
    assert float(run.loss().log_ratio.abs().max()) > 0

    for loss in ("mse", "patch_weighted_mse", "reconstruction"):
        plain = FixedBatch(fixed_batch_cfg(f"model.trainable={mode}", f"loss.type={loss}"))
        assert plain.setup.reference is None and plain.engine.reference is None
        assert not plain.models.ip_unet.has_reference


def test_reference_unet_dtype_follows_the_config():
    cfg = fixed_batch_cfg("model.trainable=unet", "loss.type=diffusion_dpo", "model.reference_dtype=bf16")
    run = FixedBatch(cfg)
    assert {p.dtype for p in run.engine.reference.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in run.models.ip_unet.unet.parameters()} == {torch.float32}  # fp32 master weights
    out = run.loss()  # the bf16 reference's prediction meets the fp32 policy's in the fused loss
    assert torch.isfinite(out.loss) and float(out.log_ratio.abs().max()) > 0  # bf16 rounding: not exactly equal
    auto = FixedBatch(fixed_batch_cfg("model.trainable=unet", "loss.type=diffusion_dpo"))
    assert {p.dtype for p in auto.engine.reference.parameters()} == {torch.float32}  # mixed_precision: no


@pytest.mark.parametrize("mode", ["unet_lora", "unet"])
def test_eight_bit_adamw_and_gradient_checkpointing(mode):
    plain = FixedBatch(fixed_batch_cfg(f"model.trainable={mode}", "loss.type=patch_dpo", *LEARN["patch_dpo"]))
    ckpt = FixedBatch(fixed_batch_cfg(f"model.trainable={mode}", "loss.type=patch_dpo", *LEARN["patch_dpo"],
                           "model.gradient_checkpointing=true"))  # fmt: skip
    assert ckpt.models.ip_unet.unet.is_gradient_checkpointing
    for run in (plain, ckpt):
        run.engine.optimizer.zero_grad(set_to_none=True)
        run.loss(train=True).loss.backward()
    grads = [{n: p.grad for n, p in r.models.ip_unet.named_trainable_parameters()} for r in (plain, ckpt)]
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-7, msg=name)

    bnb = FixedBatch(fixed_batch_cfg(f"model.trainable={mode}", "loss.type=patch_dpo", *LEARN["patch_dpo"],
                          "optim.optimizer=adamw8bit", "model.gradient_checkpointing=true"))  # fmt: skip
    assert type(bnb.engine.optimizer).__name__ == "AdamW8bit"
    start = float(bnb.loss().loss)
    bnb.step(3)
    assert float(bnb.loss().loss) < start


def test_bad_trainable_configs_get_one_line_errors():
    cases = {
        "model.trainable=lora": r"model\.trainable: Input should be 'ip_adapter', 'unet_lora', 'unet'",
        "model.trainable=unet+unet_lora": r"model\.trainable",
        "model.lora.rank=0": r"model\.lora\.rank",
        "model.lora.dropout=1.0": r"model\.lora\.dropout",
        "model.lora.target_modules=[]": r"model\.lora\.target_modules",
        "model.lora.target_modules=[to_k_ip]": r"model\.lora\.target_modules: the IP-Adapter's own projections",
        "model.reference_dtype=int8": r"model\.reference_dtype",
    }
    for override, pattern in cases.items():
        with pytest.raises(ConfigError, match=pattern) as info:
            fixed_batch_cfg(override)
        assert "\n" not in str(info.value), str(info.value)
    with pytest.raises(ConfigError, match=r"model\.train_resampler: model\.trainable=unet_lora keeps the adapter"):
        fixed_batch_cfg("model.trainable=unet_lora", "model.train_resampler=true")
    with pytest.raises(ConfigError, match=r"model\.train_unet: is the older spelling of model\.trainable"):
        fixed_batch_cfg("model.trainable=unet", "model.train_unet=true")
    assert fixed_batch_cfg("model.train_unet=true").model.effective_trainable == "ip_adapter+unet"
    assert fixed_batch_cfg().model.effective_trainable == "ip_adapter"  # the default is today's behaviour


def _runfixed_batch_cfg(tmp_path: Path, name: str, *overrides: str):
    base = [f"train.output_dir={tmp_path / name}", f"cache.dir={tmp_path / 'cache'}", "cache.on_stale=rebuild",
            "data.procedural.num_pairs=4", "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=2",
            "train.keep_checkpoints=null", "loss.type=patch_dpo", "loss.beta=1000", "optim.lr=1e-3",
            "model.lora.rank=4"]  # fmt: skip
    return load_config(TINY, [*base, *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["unet_lora", "unet"])
def test_resume_is_bit_exact_and_refuses_another_trainable(tmp_path, mode):
    from diffusers import UNet2DConditionModel

    extra = [f"model.trainable={mode}", "train.export_dtype=fp32"]
    result = train(_runfixed_batch_cfg(tmp_path, "straight", *extra))
    unet_file = "unet_lora.safetensors" if mode == "unet_lora" else "unet.safetensors"
    final = load_file(str(result.last_checkpoint / unet_file))
    initial = load_file(str(tmp_path / "straight" / "checkpoints" / "step_00000002" / unet_file))
    assert any(not torch.equal(final[k], initial[k]) for k in final)  # the UNet side trained between checkpoints

    shutil.copytree(result.output_dir, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    with pytest.raises(ResumeConfigError, match=r"model\.trainable"):
        train(_runfixed_batch_cfg(tmp_path, "resumed", "model.trainable=ip_adapter"), resume="latest")
    resumed = train(_runfixed_batch_cfg(tmp_path, "resumed", *extra), resume="latest")
    again = load_file(str(resumed.last_checkpoint / unet_file))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    a = load_file(str(result.last_checkpoint / "adapter.safetensors"))
    b = load_file(str(resumed.last_checkpoint / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.fixed_batch_loss_end == result.fixed_batch_loss_end

    if mode == "unet":  # the export: a stock diffusers unet/ folder in unet_export_dtype (fp32 by default)
        stock = UNet2DConditionModel.from_pretrained(result.output_dir / "unet", local_files_only=True)
        state = stock.state_dict()
        assert set(state) == set(final) and all(torch.equal(state[k], final[k]) for k in final)
    else:
        lora = load_file(str(result.output_dir / "unet_lora" / "pytorch_lora_weights.safetensors"))
        assert lora and all(k.startswith("unet.") and v.dtype == torch.float32 for k, v in lora.items())


def test_full_unet_export_dtype(tmp_path):
    from diffusers import UNet2DConditionModel

    from patchdpo_fast.training.export import export_run

    cfg = fixed_batch_cfg("model.trainable=unet", "loss.type=mse", "train.unet_export_dtype=fp16")
    run = FixedBatch(cfg)
    paths = export_run(cfg, run.models, run.setup.mode, tmp_path)
    assert set(paths) == {"adapter", "unet"}
    stored = load_file(str(paths["unet"] / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    stock = UNet2DConditionModel.from_pretrained(paths["unet"], local_files_only=True, torch_dtype=torch.float16)
    ours = run.models.ip_unet.unet_state_dict()
    state = stock.state_dict()
    assert set(state) == set(ours) and all(torch.equal(state[k], ours[k].half()) for k in ours)


def test_every_shipped_config_validates():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert {"tiny_cpu_unet_lora.yaml", "tiny_cpu_unet.yaml"} <= {c.name for c in configs}
    for path in configs:
        load_config(path, check_paths=False)
    assert load_config(REPO / "configs" / "tiny_cpu_unet_lora.yaml").model.unet_training == "lora"
    assert load_config(REPO / "configs" / "tiny_cpu_unet.yaml").model.unet_training == "full"


def test_ema_average_update_swap_and_errors():
    from patchdpo_fast.training.ema import EMAWeights

    w = torch.nn.Parameter(torch.zeros(3))
    ema = EMAWeights([("w", w)], decay=0.75)
    with torch.no_grad():
        w.fill_(4.0)
    ema.update()
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 1.0))  # 0.75 * 0 + 0.25 * 4
    with ema.applied():
        assert torch.equal(w.detach(), torch.full((3,), 1.0))
    assert torch.equal(w.detach(), torch.full((3,), 4.0))
    with pytest.raises(KeyError, match="missing"):
        ema.load_state_dict({})
    with pytest.raises(ValueError, match="decay"):
        EMAWeights([("w", w)], decay=1.0)
    with pytest.raises(ConfigError, match=r"optim\.use_ema"):
        fixed_batch_cfg("optim.use_ema=true", "deepspeed.zero_stage=3")


@pytest.mark.slow
def test_ema_is_checkpointed_resumed_exactly_and_exported(tmp_path):
    extra = ["model.trainable=unet_lora", "optim.use_ema=true", "optim.ema_decay=0.5", "train.export_dtype=fp32"]
    result = train(_runfixed_batch_cfg(tmp_path, "straight", *extra))
    ema = load_file(str(result.last_checkpoint / "ema.safetensors"))
    lora = load_file(str(result.last_checkpoint / "unet_lora.safetensors"))
    assert set(ema) == {f"unet.{k}" for k in lora}  # the trainable parameters: the LoRA only
    assert any(not torch.equal(ema[f"unet.{k}"], v) for k, v in lora.items())
    # the export holds the average, folded into diffusers' layout (B scaled by alpha / rank = 1 here)
    exported = load_file(str(result.output_dir / "unet_lora" / "pytorch_lora_weights.safetensors"))
    some = next(k for k in ema if ".lora_B." in k)
    assert torch.equal(exported[f"{some.split('.lora_B.')[0]}.lora_B.weight"], ema[some])

    shutil.copytree(result.output_dir, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    resumed = train(_runfixed_batch_cfg(tmp_path, "resumed", *extra), resume="latest")
    again = load_file(str(resumed.last_checkpoint / "ema.safetensors"))
    assert all(torch.equal(ema[k], again[k]) for k in ema)
    with pytest.raises(ResumeConfigError, match=r"optim\.use_ema"):
        train(
            _runfixed_batch_cfg(tmp_path, "resumed", "model.trainable=unet_lora", "train.export_dtype=fp32"),
            resume="latest",
        )


@pytest.mark.parametrize("mode", ["ip_adapter", "unet_lora", "unet", "ip_adapter+unet_lora"])
def test_saved_parameters_are_exactly_what_checkpoints_and_exports_read(mode):
    """Under ZeRO-3 only ``saved_parameters`` are gathered to save: they must cover every tensor a checkpoint or an
    export reads (else it would read an empty partition) and leave the frozen base UNet of the other modes out."""
    cfg = fixed_batch_cfg(f"model.trainable={mode}", "loss.type=patch_dpo")
    models = build_models(cfg, ENV)
    setup = setup_trainable(cfg, models)
    ip_unet = models.ip_unet
    whole = setup.mode.unet == "full"
    saved = {id(p) for p in ip_unet.saved_parameters(whole_unet=whole)}
    by_storage = {p.data_ptr(): id(p) for p in ip_unet.parameters()}
    read = [*models.adapter_state_dict().values(), *ip_unet.unet_lora_state_dict().values()]
    read += [t for group in ip_unet.ip_adapter_state_dicts() for t in group.values()]
    if whole:
        read += list(ip_unet.unet_state_dict().values())
    read_ids = {by_storage[t.data_ptr()] for t in read if t.data_ptr() in by_storage}  # parameters, not buffers
    assert read_ids <= saved
    assert {id(p) for p in ip_unet.parameters() if p.requires_grad} <= saved  # what trains is saved
    frozen_base = [p for n, p in ip_unet.unet.named_parameters() if "conv_in" in n]
    assert all((id(p) in saved) == whole for p in frozen_base)
