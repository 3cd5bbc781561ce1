"""Run the three PatchDPO losses forward and backward on both backends and print how well they agree.

``python -m patchdpo_fast.ops_demo`` (or ``patchdpo ops-demo``). Without a CUDA device the Triton kernels run in
Triton's CPU interpreter (``TRITON_INTERPRET=1`` is set here before the kernels are imported).
"""

from __future__ import annotations

import argparse
import os
import time

__all__ = ["main", "run_demo"]


def run_demo(batch_pairs: int = 2, channels: int = 4, size: int = 32, stride: int = 4, seed: int = 0) -> list[dict]:
    """Compare the Triton and PyTorch backends on random SDXL-like latents; returns one row per loss."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from patchdpo_fast.ops import diffusion_dpo_loss, patch_dpo_loss, patch_weighted_mse, patchdpo_weights

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(seed)
    n = 2 * batch_pairs
    shape = (n, channels, size, size)
    pred = torch.randn(shape, generator=gen).to(device)
    target = torch.randn(shape, generator=gen).to(device)
    ref = (pred.cpu() + 0.1 * torch.randn(shape, generator=gen)).to(device)
    grid = (batch_pairs, size // stride, size // stride)
    q_ref, q_gen = torch.rand(grid, generator=gen).to(device), torch.rand(grid, generator=gen).to(device)

    cases = {
        "patch_weighted_mse": lambda p, b: patch_weighted_mse(p, target, patchdpo_weights(q_ref, q_gen), backend=b),
        "diffusion_dpo": lambda p, b: diffusion_dpo_loss(p, ref, target, beta=5000.0, backend=b),
        "patch_dpo": lambda p, b: patch_dpo_loss(
            p, ref, target, patchdpo_weights(q_ref, q_gen, "dpo"), beta=5000.0, backend=b
        ),
    }
    rows = []
    for name, fn in cases.items():
        results = {}
        for backend in ("torch", "triton", "fp64"):
            p = pred.clone().requires_grad_(True)
            start = time.perf_counter()
            # the reference in float64 is the yardstick for both fp32 backends
            out = fn(p.double(), "torch") if backend == "fp64" else fn(p, backend)
            out.loss.backward()
            results[backend] = (out.loss.item(), p.grad, out.implicit_acc, time.perf_counter() - start)
        (l_t, g_t, _, s_t), (l_k, g_k, acc, s_k), (l_64, g_64, _, _) = (results[k] for k in ("torch", "triton", "fp64"))
        rows.append(
            {
                "loss": name,
                "fp64": l_64,
                "torch": l_t,
                "triton": l_k,
                "torch_err": abs(l_t - l_64),
                "triton_err": abs(l_k - l_64),
                "torch_grad_err": (g_t - g_64).abs().max().item(),
                "triton_grad_err": (g_k - g_64).abs().max().item(),
                "grad_max_abs": g_64.abs().max().item(),
                "implicit_acc": None if acc is None else acc.item(),
                "seconds_torch": s_t,
                "seconds_triton": s_k,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchdpo ops-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="pairs per batch (N = 2 * pairs)")
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--stride", type=int, default=4, help="patch stride of the quality maps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = run_demo(batch_pairs=args.pairs, size=args.size, stride=args.stride, seed=args.seed)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    print(
        f"PatchDPO losses, N={2 * args.pairs} C=4 H=W={args.size} patch stride {args.stride}"
        f"{' (Triton in CPU interpreter mode)' if interp else ''}"
    )
    print("errors against the float64 reference (loss |err|, gradient max |err|):")
    print(f"{'loss':<20}{'fp64':>12}{'torch fp32':>12}{'triton':>12}{'grad torch':>12}{'grad triton':>12}")
    ok = True
    for r in rows:
        print(
            f"{r['loss']:<20}{r['fp64']:>12.7f}{r['torch_err']:>12.2e}{r['triton_err']:>12.2e}"
            f"{r['torch_grad_err']:>12.2e}{r['triton_grad_err']:>12.2e}"
        )
        # Triton must be about as accurate as the fp32 PyTorch reference: within 2x of its error, or within an
        # fp32 allowance (beta = 5000 amplifies rounding of the per-sample errors by ~beta/2 in the DPO logit).
        ok &= r["triton_err"] <= max(2 * r["torch_err"], 1e-5 * max(1.0, abs(r["fp64"])))
        ok &= r["triton_grad_err"] <= max(2 * r["torch_grad_err"], 1e-4 * r["grad_max_abs"])
    print("backends agree: Triton is as accurate as the fp32 reference" if ok else "BACKENDS DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    from patchdpo_fast.cli import run_command

    raise SystemExit(run_command("ops-demo", main))
