"""The ``patchdpo`` command line: ``patchdpo <command> [options]``."""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]

#: command -> (module with a ``main(argv)`` function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("patchdpo_fast.train", "train IP-Adapter-Plus with PatchDPO (see configs/)"),
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
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``patchdpo <command>`` to the command's module; the module is imported only when used."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: patchdpo <command> [options]\n\ncommands:")
        width = max(len(name) for name in COMMANDS) + 2
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<{width}}{help_text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"patchdpo: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
