"""Memory traffic of each loss implementation, counted from what it runs, and the ideal minimum.

* ``triton``: every kernel launch of the fused path is recorded (``patchdpo_fast.kernels.launch.record_launches``) with
  the bytes of each tensor it reads and writes; the streaming kernels touch every element of those tensors once.
* ``eager``: a ``TorchDispatchMode`` adds up the input and output bytes of every aten op the reference functions and
  autograd run (view and allocation ops excluded: they move no data). An upper bound of the DRAM traffic (a
  small input may come from cache), the standard way to count eager traffic.
* ``compiled``: the kernels Inductor generated are wrapped, and each call adds the bytes of the buffers it is given,
  read for inputs, written for outputs, both for in-out buffers (parsed from the generated kernel signatures). This
  counts the generated code of the compile that ran: on the CPU the C++ kernels, on CUDA the Triton kernels (the
  two backends fuse differently, so CPU counts do not carry over to a GPU). Extern kernels (aten calls from the
  generated wrapper) are not: a graph that calls one gets ``None`` with the reason, as does anything that cannot be
  instrumented.
* ``ideal``: each input read once and each output written once: ``pred``, ``target`` (, ``ref_pred``) and the weight
  map read, the loss and per-sample terms written; fwd+bwd adds only the ``grad_pred`` write. ``patch_weighted_mse``
  reaches it in one pass; the DPO losses cannot (their gradient coefficient needs the whole forward reduction first,
  so a second pass re-reads pred, target and the weights).

``python benchmarks/traffic.py table`` prints and writes the byte table of the README (32x4x128x128, fp32 and bf16,
s = 1, 2, 8) on the CPU; ``python benchmarks/traffic.py recount RESULTS.json`` recounts the bytes of an existing
benchmark result file at each case's shape (eager and compiled on the CPU, Triton from its launches) and rewrites
its bytes and GB/s fields and its markdown report.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

# bench_common also makes patchdpo_fast.kernels importable from an uninstalled checkout
import bench_common as bc

MIB = 1024**2

# ---------------------------------------------------------------------------------------------------------------
# Ideal
# ---------------------------------------------------------------------------------------------------------------


def ideal_bytes(op: str, pas: str, x: bc.Inputs) -> int:
    """The fewest bytes any implementation can move: every input read once, every output written once."""
    n = x.pred.shape[0]
    outputs = 4 * (1 + 2 * n)  # loss, model_err, model_mse
    if bc.HAS_REF[op]:
        outputs += 4 * (n + n // 2 + 1)  # ref_err, log_ratio, implicit_acc
    total = bc._nbytes(x.pred) + bc._nbytes(x.target) + bc._nbytes(x.ref_pred) + bc._nbytes(x.weight) + outputs
    if pas == "fwd_bwd":
        total += bc._nbytes(x.pred)  # grad_pred
    return total


# ---------------------------------------------------------------------------------------------------------------
# Eager: aten ops through a dispatch mode
# ---------------------------------------------------------------------------------------------------------------


def _tensor_bytes(tree: Any) -> int:
    leaves, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


_NO_DATA = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense")


class AtenBytes(TorchDispatchMode):
    """Input + output bytes of every aten op that moves data (views and allocations excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ops = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in _NO_DATA or name in ("detach", "alias", "lift_fresh"):
            return out
        moved = _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        self.bytes += moved
        self.ops += 1
        self.by_op[name] = self.by_op.get(name, 0) + moved
        return out


def count_eager(step: Callable[[], object]) -> int:
    with AtenBytes() as mode:
        step()
    return mode.bytes


# ---------------------------------------------------------------------------------------------------------------
# Triton: recorded launches
# ---------------------------------------------------------------------------------------------------------------


def count_triton(step: Callable[[], object], execute: bool = True) -> int:
    from patchdpo_fast.kernels.launch import record_launches

    with record_launches(execute=execute) as rec:
        step()
    return rec.bytes_moved


# ---------------------------------------------------------------------------------------------------------------
# torch.compile: wrap the generated kernels
# ---------------------------------------------------------------------------------------------------------------

_ACTIVE: list[dict[str, Any]] = []
_PTR_RE = re.compile(r"\b(in_out_ptr|in_ptr|out_ptr)\d+\b")


def _kernel_params(source: str, name: str) -> list[str] | None:
    """Parameter names (in order) of generated kernel ``name`` from its module source: C++ or Triton."""
    i = source.find(f"{name} = async_compile.")
    if i < 0:
        return None
    body = source[i:]
    m = re.search(r"void\s+kernel\(([^)]*)\)", body[:200000]) if ".cpp_pybinding(" in body[:200] else None
    if m is None:
        m = re.search(rf"def {re.escape(name)}\(([^)]*)\)", body)
    if m is None:
        return None
    return [p.strip().split()[-1].lstrip("*") for p in m.group(1).split(",") if p.strip()]


class _Counted:
    """Stands in for a generated kernel: counts its buffers' bytes while a count is active, then calls it."""

    def __init__(self, kernel: Any, params: list[str], name: str) -> None:
        self._kernel, self._params, self._name = kernel, params, name

    def _count(self, args: tuple) -> None:
        if not _ACTIVE:
            return
        total = 0
        for pname, arg in zip(self._params, args, strict=False):
            if not isinstance(arg, torch.Tensor):
                continue
            kind = _PTR_RE.search(pname)
            nb = arg.numel() * arg.element_size()
            total += 2 * nb if kind and kind.group(1) == "in_out_ptr" else nb
        _ACTIVE[-1]["bytes"] += total
        _ACTIVE[-1]["kernels"] += 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # C++ kernels: called directly
        self._count(args)
        return self._kernel(*args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:  # Triton kernels: `kernel.run(*args, stream=...)`
        self._count(args)
        return self._kernel.run(*args, **kwargs)

    def __getattr__(self, item: str) -> Any:
        return getattr(self._kernel, item)


def _instrument_generated_modules() -> list[str]:
    """Wrap every generated kernel of every loaded Inductor module (once); returns problems found."""
    from torch._inductor.codecache import PyCodeCache

    problems = []
    for mod in list(PyCodeCache.modules):
        if getattr(mod, "_patchdpo_counted", False):
            continue
        if not callable(getattr(mod, "call", None)):  # a kernel's own module, not a graph's wrapper
            mod._patchdpo_counted = True
            continue
        try:
            source = Path(mod.__file__).read_text()
        except (OSError, TypeError):
            problems.append(f"no source for {getattr(mod, '__name__', mod)}")
            continue
        for name, obj in list(vars(mod).items()):
            if not name.startswith(("cpp_fused", "triton_", "cpp_kernel")) or isinstance(obj, _Counted):
                continue
            params = _kernel_params(source, name)
            if params is None:
                problems.append(f"cannot parse the signature of {name}")
                continue
            setattr(mod, name, _Counted(obj, params, name))
        extern = re.findall(r"\b(?:extern_kernels|aten|torch\.ops\.\w+)\.(\w+)\(", source)
        if extern:
            problems.append(f"extern kernels not counted: {', '.join(sorted(set(extern)))}")
        mod._patchdpo_counted = True
    return problems


def count_compiled(step: Callable[[], object]) -> tuple[int | None, str | None]:
    """Bytes the generated code of an already-compiled (warmed-up) callable moves in one call."""
    try:
        problems = _instrument_generated_modules()
    except Exception as exc:  # torch internals moved
        return None, f"cannot instrument Inductor's generated modules ({type(exc).__name__}: {exc})"
    if problems:
        return None, "; ".join(problems)
    record = {"bytes": 0, "kernels": 0}
    _ACTIVE.append(record)
    try:
        step()
    finally:
        _ACTIVE.pop()
    if record["kernels"] == 0:
        return None, "no generated kernel ran (graph fell back to eager or nothing was compiled)"
    return int(record["bytes"]), None


# ---------------------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------------------


def fused_step(op: str, pas: str, x: bc.Inputs) -> Callable[[], object]:
    """The Triton path's step through its autograd Function, dispatch bypassed (so that launches can be recorded
    on any device with ``execute=False``): the exact launch sequence of ``backend="triton"``."""
    from patchdpo_fast.ops.autograd import FusedPatchLoss, one_pass_eligible

    def fwd() -> torch.Tensor:
        is_dpo = op != "patch_weighted_mse"
        one_pass = one_pass_eligible(x.pred, is_dpo)
        return FusedPatchLoss.apply(x.pred, x.target, x.ref_pred, x.weight, bc.BETA, is_dpo, one_pass)[0]

    if pas == "fwd":
        return fwd
    return lambda: torch.autograd.grad(fwd(), x.pred)[0]


def case_bytes(op: str, pas: str, x: bc.Inputs, impls: tuple[str, ...] = ("triton", "eager", "compiled")) -> dict:
    """Bytes per call of each implementation at this case, plus the ideal.

    ``compiled`` counts the benchmark's dynamic-shape compile, ``compiled_static`` a shape-specialized one (each is
    compiled here if it is not yet); ``<impl>_reason`` says why a count is ``None``.
    """
    out: dict[str, Any] = {"ideal": ideal_bytes(op, pas, x)}
    for impl in impls:
        if impl == "triton":
            out["triton"] = count_triton(fused_step(op, pas, x), execute=x.pred.device.type == "cuda")
        elif impl == "eager":
            out["eager"] = count_eager(bc.make_step(op, "eager", pas, x))
        else:
            step = bc.make_step(op, impl, pas, x)
            step()  # compile (and the backward graph, for fwd_bwd)
            out[impl], out[f"{impl}_reason"] = count_compiled(step)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The README table
# ---------------------------------------------------------------------------------------------------------------


def table(shape: tuple[int, int, int, int], dtypes: tuple[torch.dtype, ...], strides: tuple[int, ...]) -> list[dict]:
    rows = []
    n, c, h, w = shape
    for dtype in dtypes:
        for op in bc.OPS:
            for s in strides if bc.HAS_WEIGHT[op] else (None,):
                case = bc.Case("bytes", op, n, c, h, w, s)
                x = bc.make_inputs(case, torch.device("cpu"), dtype)
                torch._dynamo.reset()  # one shape-specialized compile per case, as a fixed-shape training run gets
                for pas in bc.PASSES:
                    counts = case_bytes(op, pas, x, ("triton", "eager", "compiled_static"))
                    counts["compiled"] = counts.pop("compiled_static")
                    counts["compiled_reason"] = counts.pop("compiled_static_reason")
                    rows.append({"op": op, "dtype": str(dtype).replace("torch.", ""), "stride": s, "pass": pas,
                                 "shape": list(shape), **counts})  # fmt: skip
                    print(format_row(rows[-1]), flush=True)
    return rows


def format_row(r: dict) -> str:
    ideal = r["ideal"]

    def cell(k: str) -> str:
        v = r.get(k)
        return "—" if v is None else f"{v / MIB:.1f} ({v / ideal:.2f}x)"

    s = "—" if r["stride"] is None else r["stride"]
    return (f"| {r['op']} | {r['dtype']} | {s} | {r['pass']} | {cell('eager')} | {cell('compiled')} | "
            f"{cell('triton')} | {ideal / MIB:.1f} |")  # fmt: skip


TABLE_HEAD = (
    "| op | dtype | s | pass | eager MiB (x ideal) | torch.compile MiB (x ideal) | Triton MiB (x ideal) | ideal MiB |\n"
    "|---|---|---|---|---|---|---|---|"
)


# ---------------------------------------------------------------------------------------------------------------
# Recount an existing result file
# ---------------------------------------------------------------------------------------------------------------


def recount(path: Path) -> int:
    """Recount bytes for every loss record of a result JSON at its shape (on this machine's CPU) and rewrite the
    bytes and GB/s fields (in the JSON-lines file next to it too), then the markdown report next to it."""
    import json

    import report

    data = json.loads(path.read_text())
    cache: dict[tuple, dict] = {}
    jsonl = path.with_suffix(".jsonl")
    lines = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()] if jsonl.exists() else []
    infos = [b.get("extra_info") or {} for b in data.get("benchmarks", [])]
    infos += [x.get("extra_info") or {} for x in lines if x.get("type") == "benchmark"]
    for info in infos:
        if info.get("kind") != "loss":
            continue
        shape = tuple(info["shape"])
        key = (info["op"], shape, info.get("stride"), info["dtype"], info["pass"])
        if key not in cache:
            case = bc.Case(info["suite"], info["op"], *shape, info.get("stride"))
            x = bc.make_inputs(case, torch.device("cpu"), getattr(torch, info["dtype"]))
            cache[key] = case_bytes(info["op"], info["pass"], x, ("triton", "eager"))
        if info["impl"] not in cache[key]:  # the compile the record measured: dynamic shapes or static
            case = bc.Case(info["suite"], info["op"], *shape, info.get("stride"))
            x = bc.make_inputs(case, torch.device("cpu"), getattr(torch, info["dtype"]))
            cache[key].update(case_bytes(info["op"], info["pass"], x, (info["impl"],)))
            print(f"recount: {key}: {cache[key]}", flush=True)
        apply_counts(info, cache[key], info["impl"])
    path.write_text(json.dumps(data, indent=4, default=str) + "\n")  # pytest-benchmark's own indent
    if lines:
        jsonl.write_text("".join(json.dumps(x, default=str) + "\n" for x in lines))
    machine, records, date = report.load(path)
    md = path.with_suffix(".md")
    md.write_text(report.render(machine, records, date))
    print(f"recount: rewrote {path} and {md}")
    return 0


def apply_counts(info: dict, counts: dict, impl: str) -> None:
    """Set ``bytes_moved`` (this implementation's own bytes), ``ideal_bytes``, ``bytes_ratio`` and the GB/s fields."""
    own = counts.get(impl)
    info["ideal_bytes"] = counts["ideal"]
    info["bytes_moved"] = own
    info["bytes_source"] = {
        "triton": "recorded kernel launches",
        "eager": "aten dispatch mode (inputs + outputs of every op)",
    }.get(impl, "generated kernels' buffers")
    if own is None:
        info["bytes_reason"] = counts.get(f"{impl}_reason")
    info["bytes_ratio"] = None if own is None else own / counts["ideal"]
    for field, time_field in (("gbps", "median_s"), ("device_gbps", "device_time_s")):
        t = info.get(time_field)
        info[field] = None if (own is None or not t) else own / t / 1e9


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="the README byte table on the CPU")
    t.add_argument("--shape", default="32,4,128,128")
    t.add_argument("--strides", default="1,2,8")
    t.add_argument("--dtypes", default="float32,bfloat16")
    t.add_argument("--out-md", type=Path, default=None)
    r = sub.add_parser("recount", help="recount the bytes of an existing result JSON and rebuild its report")
    r.add_argument("results", type=Path)
    args = ap.parse_args(argv)
    bc.configure_dynamo()
    with _threads(2):
        if args.cmd == "recount":
            return recount(args.results)
        shape = tuple(int(v) for v in args.shape.split(","))
        print(TABLE_HEAD)
        rows = table(shape, tuple(getattr(torch, d) for d in args.dtypes.split(",")),
                     tuple(int(v) for v in args.strides.split(",")))  # fmt: skip
    if args.out_md:
        lines = [f"Bytes per call at {'x'.join(map(str, shape))} (CPU count; see benchmarks/traffic.py)", "",
                 TABLE_HEAD, *(format_row(x) for x in rows), ""]  # fmt: skip
        args.out_md.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
