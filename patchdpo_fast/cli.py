"""The ``patchdpo`` command line: ``patchdpo <command> [options]``.

Every command runs through :func:`run_command`, so all of them report a user error the same way: one line on
stderr, ``patchdpo <command>: <what is wrong and what is expected>``, and exit status 2. ``--debug`` (any position)
or ``PATCHDPO_DEBUG=1`` shows the full traceback instead. ``python -m patchdpo_fast.<module>`` and
``deepspeed patchdpo_fast/train.py`` go through the same wrapper.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from patchdpo_fast.errors import UserError

__all__ = ["COMMANDS", "USER_ERRORS", "describe_user_error", "is_user_error", "main", "run_command"]

#: command -> (module with a ``main(argv)`` function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("patchdpo_fast.train", "train with PatchDPO / Diffusion-DPO: IP-Adapter, UNet LoRA or UNet (configs/)"),
    "estimate-memory": (
        "patchdpo_fast.training.memory",
        "per-GPU memory plan of a config (--world-size, --zero-stage, --offload, --architecture), built on meta",
    ),
    "build-pairs": ("patchdpo_fast.data.build_pairs", "generate training pairs with the pre-trained model (manifest)"),
    "import-official": ("patchdpo_fast.data.import_official", "import the official PatchDPO pair layout"),
    "procedural-pairs": ("patchdpo_fast.data.procedural", "write the procedural demo pairs as a manifest"),
    "quality-train": ("patchdpo_fast.quality.train_backbone", "self-supervised training of the patch-quality backbone"),
    "quality": ("patchdpo_fast.quality.manifest_maps", "compute patch quality maps for a manifest (--visualize)"),
    "quality-eval": ("patchdpo_fast.quality.evaluate", "corruption-localization benchmark (AUROC, AP) of an estimator"),
    "generate": ("patchdpo_fast.eval.generate", "generate the DreamBench protocol with an IP-Adapter-Plus adapter"),
    "evaluate": ("patchdpo_fast.eval.evaluate", "score DreamBench images: DINO, CLIP-I, CLIP-T beside the paper"),
    "minibench": ("patchdpo_fast.minibench.runner", "PatchDPO's comparison in a mini world learnt from scratch (CPU)"),
    "ops-demo": ("patchdpo_fast.ops_demo", "compare the fused Triton losses with the PyTorch reference"),
    "kernels-report": ("patchdpo_fast.kernels_report", "compile the Triton kernels for sm_80/sm_90 without a GPU"),
}

#: Exception types reported as user errors (one line, exit status 2): problems with the input, not bugs.
#: ``ValueError`` covers the validation errors of configs, manifests, images and arguments; ``OSError`` missing,
#: unreadable or unwritable paths and a full disk; ``FloatingPointError`` the non-finite-loss abort.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, FloatingPointError)

_DEBUG_FLAG = "--debug"
_MAX_ITEMS = 5  # items of a listed error shown in its one line
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"
_DEBUG_ENV = "PATCHDPO_DEBUG"


def _extra_user_errors() -> tuple[type[BaseException], ...]:
    """User-error types of optional layers that do not derive from the ones above (imported only if loaded)."""
    found: list[type[BaseException]] = []
    attention = sys.modules.get("patchdpo_fast.models.attention")
    if attention is not None:
        found.append(attention.XFormersUnavailableError)
    cache = sys.modules.get("patchdpo_fast.data.cache")
    if cache is not None:
        found.append(cache.CacheError)
    return tuple(found)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a problem the user can fix (see :data:`USER_ERRORS`)."""
    return isinstance(exc, USER_ERRORS + _extra_user_errors())


def describe_user_error(exc: BaseException) -> str:
    """The message printed for a user error: the exception's text, with the path for OS errors."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        hint = " (free some space or choose another folder)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return f"{exc.strerror}: {where}{hint}" if where else f"{exc.strerror}{hint}"
    text = str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1:  # KeyError quotes its message
        text = str(exc.args[0])
    if _WORKER_TRACEBACK in text:  # re-raised from a DataLoader worker: keep the original message only
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.startswith(type(exc).__name__ + ": ") else last
    lines = [line.strip().removeprefix("- ").strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:  # a listed error (several config keys, bad manifest records): one line, the first items
        items = lines[1:]
        more = f"; and {len(items) - _MAX_ITEMS} more" if len(items) > _MAX_ITEMS else ""
        text = f"{lines[0].rstrip(':')}: {'; '.join(items[:_MAX_ITEMS])}{more}"
    return text or type(exc).__name__


def _close_progress_bars() -> None:
    """Close progress bars left open by the failed command, so the error starts on a line of its own."""
    std = sys.modules.get("tqdm.std")
    if std is not None:
        for bar in list(getattr(std.tqdm, "_instances", ())):
            bar.close()


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` among the arguments, or ``PATCHDPO_DEBUG`` set to anything but ``""`` / ``"0"``."""
    return _DEBUG_FLAG in argv or os.environ.get(_DEBUG_ENV, "0") not in ("", "0")


def run_command(name: str, command_main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``command_main(argv)`` with the shared error handling; returns the exit status.

    A user error (:func:`is_user_error`) prints one line ``patchdpo <name>: <message>`` on stderr and returns 2; an
    interrupt prints ``interrupted`` and returns 130. With ``--debug`` / ``PATCHDPO_DEBUG=1`` both propagate with
    their traceback. Any other exception (a bug) always shows its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != _DEBUG_FLAG]
    try:
        return int(command_main(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        _close_progress_bars()
        print(f"patchdpo {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not is_user_error(exc):
            raise
        _close_progress_bars()
        print(f"patchdpo {name}: {describe_user_error(exc)}", file=sys.stderr)
        return 2


#: top-level modules of the `[train]` extra (the core install is torch, triton, numpy and safetensors only)
TRAINING_STACK = frozenset(
    {"diffusers", "transformers", "accelerate", "deepspeed", "bitsandbytes", "pydantic", "yaml", "tqdm", "PIL"}
)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``patchdpo <command>`` to the command's module; the module is imported only when used."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: patchdpo <command> [options] [--debug]\n\ncommands:")
        width = max(len(name) for name in COMMANDS) + 2
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<{width}}{help_text}")
        print(f"\nA user error prints one line and exits with status 2; {_DEBUG_FLAG} (or {_DEBUG_ENV}=1) shows the "
              "traceback.")  # fmt: skip
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"patchdpo: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return run_command(name, module.main, rest)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TRAINING_STACK:
            raise
        print(
            f"patchdpo {name}: needs the training stack, but {exc.name!r} is not installed; "
            "install it with: pip install 'patchdpo_fast[train]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
