"""Saves write tensors from where they are: no second copy of the optimizer state or of the adapter."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
from safetensors.torch import load_file

from patchdpo_fast.models import build_models
from patchdpo_fast.training.memory import AllocationTracker, tensor_bytes
from patchdpo_fast.training.state_io import load_state, save_state
from patchdpo_fast.utils import write_safetensors

MB = 1 << 20


def _measure(fn) -> tuple[int, int]:
    """(peak bytes of tensors allocated by ``fn``, peak bytes of Python/numpy allocations during ``fn``)."""
    tracemalloc.start()
    try:
        with AllocationTracker() as tracker:
            fn()
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return tracker.peak_bytes, py_peak


def _optimizer_with_state(optimizer: str = "adamw") -> torch.optim.Optimizer:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(512, 1024)) for _ in range(3)]  # 2 MiB each, 6 MiB of moments each
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-3)
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_checkpoint_state_save_holds_no_copy(tmp_path, optimizer) -> None:
    opt = _optimizer_with_state(optimizer)
    state = {"optimizer": opt.state_dict(), "step": 3, "nested": [torch.arange(5), (torch.tensor(2.0),)]}
    state_bytes = tensor_bytes(pytree_leaves(state))
    assert state_bytes > 3 * MB
    torch_peak, py_peak = _measure(lambda: save_state(state, tmp_path / "trainer"))
    assert torch_peak == 0, f"the save allocated {torch_peak} bytes of tensors (state: {state_bytes})"
    assert py_peak < MB, f"the save allocated {py_peak} bytes in Python (state: {state_bytes})"

    back = load_state(tmp_path / "trainer")  # and it round-trips exactly
    got, want = pytree_leaves(back), pytree_leaves(state)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (torch.equal(a, b) and a.dtype == b.dtype) if isinstance(b, torch.Tensor) else a == b


def pytree_leaves(obj):
    from torch.utils import _pytree

    return _pytree.tree_leaves(obj)


def test_writer_copies_one_tensor_at_a_time(tmp_path) -> None:
    """Casts and non-contiguous tensors are converted one by one, so the extra memory is one tensor, not all."""
    tensors = {f"w{i}": torch.randn(256, 1024 + i) for i in range(4)}
    tensors["t"] = torch.randn(1024, 256).t()  # non-contiguous: needs a contiguous copy
    largest = max(t.numel() for t in tensors.values())
    torch_peak, py_peak = _measure(lambda: write_safetensors(tensors, tmp_path / "a.safetensors", dtype=torch.float16))
    assert torch_peak <= largest * 4  # one fp16 cast plus, for the transposed one, its fp32 contiguous copy
    all_fp16 = sum(t.numel() for t in tensors.values()) * 2
    assert torch_peak < all_fp16 / 2  # far less than converting every tensor first
    assert py_peak < MB
    back = load_file(str(tmp_path / "a.safetensors"))
    assert all(torch.equal(back[k], v.half()) for k, v in tensors.items())


def test_adapter_export_holds_no_copy_of_the_adapter(tmp_path) -> None:
    models = build_models(tiny=True, seed=0, train_resampler=True)
    image_proj, ip_adapter = models.ip_unet.ip_adapter_state_dicts()
    tensors = [*image_proj.values(), *ip_adapter.values()]
    total, largest = sum(t.numel() for t in tensors), max(t.numel() for t in tensors)
    assert total > 8 * largest  # many tensors: one at a time is far less than all at once

    fp32_peak, _ = _measure(lambda: models.export_ip_adapter(tmp_path / "fp32.safetensors", dtype=torch.float32))
    assert fp32_peak == 0  # written straight from the weights
    fp16_peak, py_peak = _measure(lambda: models.export_ip_adapter(tmp_path / "fp16.safetensors"))
    assert fp16_peak <= 2 * largest, (fp16_peak, 2 * total)
    assert py_peak < MB
