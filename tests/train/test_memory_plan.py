"""The memory accounting (built on the meta device) against what a real tiny CPU training step allocates."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree

from patchdpo_fast.config import load_config
from patchdpo_fast.training.build import build_engine, build_models
from patchdpo_fast.training.distributed import setup_distributed
from patchdpo_fast.training.memory import GIB, AllocationTracker, compare_markdown, estimate_memory, tensor_bytes

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"
SDXL = REPO / "configs" / "sdxl_ipadapter_plus.yaml"
SD15 = REPO / "configs" / "sd15_ipadapter_plus.yaml"
MB = 1 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _malloc_in_use():
    """Bytes the C allocator has handed out and not taken back (glibc ``mallinfo2``), or None where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        info = fn()
        return info.uordblks + info.hblkhd

    return in_use


def _inputs(models, pairs: int, resolution: int) -> tuple:
    """Random training-step inputs of ``2 * pairs`` images, built here independently of the memory module."""
    g = torch.Generator().manual_seed(0)
    n, cfg, enc = 2 * pairs, models.unet.config, models.image_encoder.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    tokens = (enc.image_size // enc.patch_size) ** 2 + 1
    return (
        torch.randn(n, 4, resolution // 8, resolution // 8, generator=g),
        torch.randint(0, 1000, (n,), generator=g),
        torch.randn(n, 77, cfg.cross_attention_dim, generator=g),
        torch.randn(n, pooled, generator=g),
        models.add_time_ids(n, resolution),
        torch.randn(n, tokens, enc.hidden_size, generator=g),
    )


@pytest.mark.parametrize(
    ("loss", "optimizer", "checkpointing"),
    [("patch_dpo", "adamw", False), ("patch_weighted_mse", "adamw8bit", True), ("mse", "adamw", True)],
)
def test_plan_matches_a_tiny_cpu_training_step(loss, optimizer, checkpointing):
    pairs, resolution = 2, 128
    cfg = load_config(TINY, [f"loss.type={loss}", f"optim.optimizer={optimizer}", f"data.resolution={resolution}",
                             f"model.gradient_checkpointing={str(checkpointing).lower()}",
                             f"data.pairs_per_batch={pairs}"], check_paths=False)  # fmt: skip
    plan = estimate_memory(cfg)  # on the meta device: no weights, no memory
    env = setup_distributed(False)
    models = build_models(cfg, env)  # the trainer's real CPU model
    ip_unet = models.ip_unet

    # weights: the meta accounting equals the real tensors
    reference = tensor_bytes(ip_unet.reference_parameters())
    assert plan["DPO reference"].bytes == reference
    assert (reference > 0) == (loss == "patch_dpo")
    assert plan["trainable weights"].bytes == tensor_bytes(models.trainable_parameters())
    ref_ids = {id(p) for p in ip_unet.reference_parameters()}
    frozen = [t for t in (*ip_unet.parameters(), *ip_unet.buffers()) if not t.requires_grad and id(t) not in ref_ids]
    assert plan["frozen weights"].bytes == tensor_bytes(frozen)
    encoders = [models.vae, models.text_encoder, models.text_encoder_2, models.image_encoder]
    assert plan["encoders"].bytes == tensor_bytes(t for m in encoders for t in (*m.parameters(), *m.buffers()))
    assert not plan["encoders"].resident  # released once the cache is built

    # activations: what the C allocator holds after a real policy forward, against the meta count
    engine = build_engine(cfg, models, env)
    args = _inputs(models, pairs, resolution)
    warm = engine.forward(*args)  # warm-up (lazily created buffers)
    del warm
    in_use = _malloc_in_use()
    gc.collect()
    before = in_use() if in_use else 0
    with AllocationTracker() as tracker:
        pred = engine.forward(*args)
    gc.collect()
    held = in_use() - before if in_use else None
    expected = plan[f"activations ({pairs} pairs)"].bytes
    assert tracker.live_bytes() == expected  # the same count on real CPU tensors as on meta ones
    if held is not None:  # the allocator's view adds only the autograd graph's own bookkeeping (< 1.5 MB)
        assert expected > 2 * MB
        assert abs(held - expected) <= 0.05 * expected + 1.5 * MB, (held, expected)

    # one real optimizer step: gradients and optimizer state as accounted
    loss_value = pred.float().square().mean()
    engine.backward(loss_value)
    grads = [p.grad for p in models.trainable_parameters()]
    assert all(g is not None for g in grads) and plan["gradients"].bytes == tensor_bytes(grads)
    del pred, loss_value, grads
    engine.step()
    state = tensor_bytes(pytree.tree_leaves(dict(engine.optimizer.state)))
    assert state > 0 and plan["optimizer state"].bytes == state
    assert plan["master weights"].bytes == 0 and plan["EMA"].bytes == 0
    assert plan.total_bytes == sum(i.bytes for i in plan.items if i.resident)


def _readme_table() -> list[list[str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("<!-- memory-table -->")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_readme_memory_table_is_what_the_accounting_says():
    """The README's SDXL recipe column is the output of estimate_memory on the shipped config (meta device)."""
    plan = estimate_memory(load_config(SDXL, check_paths=False), world_size=8)  # the recipe: 8 GPUs, ZeRO-2
    rows = {row[0]: row[1] for row in _readme_table()[2:]}
    for item in plan.items:
        value = f"{item.bytes / GIB:.3f}"
        assert rows[item.name] == (value if item.resident else f"({value})"), item.name
    assert rows["**total**"] == f"**{plan.total_bytes / GIB:.3f}**"
    assert plan["DPO reference"].bytes == 0  # the recipe's loss (patch_weighted_mse) builds none
    assert re.fullmatch(r"\| GiB \| as configured \|.*", compare_markdown({"as configured": plan}).splitlines()[0])


def test_readme_zero3_unet_table_is_what_the_accounting_says():
    """The README's full-UNet ZeRO-3 column (8 GPUs, zero3.json) is estimate_memory's output."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("<!-- memory-table-unet-zero3 -->")
    rows = {}
    for line in text[start:].splitlines()[3:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1]
    cfg = load_config(SDXL, ["model.trainable=unet", "loss.type=diffusion_dpo",
                             "deepspeed.config=configs/deepspeed/zero3.json"], check_paths=False)  # fmt: skip
    plan = estimate_memory(cfg, world_size=8)
    assert plan.settings["zero_stage"] == 3 and plan.settings["parallel"] == "8 GPUs, ZeRO-3"
    for item in plan.items:
        value = f"{item.bytes / GIB:.3f}"
        assert rows[item.name] == (value if item.resident else f"({value})"), item.name
    assert rows["**total**"] == f"**{plan.total_bytes / GIB:.3f}**"


def test_readme_sd15_table_is_what_the_accounting_says():
    """The README's SD1.5 table (configs/sd15_ipadapter_plus.yaml, 8 GPUs, ZeRO-2): estimate_memory of the built-in
    SD1.5 architecture that the config's model.base_architecture names, column by column."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = text[text.index("<!-- memory-table-sd15 -->") :].splitlines()[1:]
    table = [[c.strip() for c in line.strip("|").split("|")] for line in lines[: next(
        i for i, line in enumerate(lines) if not line.startswith("|"))]]  # fmt: skip
    columns = table[0][1:]
    assert columns == ["as configured", "loss.type=patch_dpo", "model.gradient_checkpointing=false"]
    rows = {row[0]: row[1:] for row in table[2:]}
    for i, column in enumerate(columns):
        overrides = [] if column == "as configured" else [column]
        plan = estimate_memory(load_config(SD15, overrides, check_paths=False), world_size=8)
        model = "SD1.5-class + IP-Adapter-Plus (built-in SD1.5 architecture, built-in ViT-H/14 image encoder)"
        assert plan.settings["model"] == model
        for item in plan.items:
            value = f"{item.bytes / GIB:.3f}"
            assert rows[item.name][i] == (value if item.resident else f"({value})"), (column, item.name)
        assert rows["**total**"][i] == f"**{plan.total_bytes / GIB:.3f}**", column
