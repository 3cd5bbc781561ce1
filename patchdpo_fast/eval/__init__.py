"""DreamBench generation and evaluation (see ``docs/dreambench.md``).

* :mod:`~patchdpo_fast.eval.dreambench` – the protocol: ``prompts_and_classes.txt`` parsing
  (:func:`parse_prompts_file` -> :class:`DreamBenchProtocol`), prompt file names (:func:`prompt_slug`), the output
  layout ``<out>/<subject>/<prompt>.png`` and its checker (:func:`check_layout`, :class:`LayoutError`).
* :mod:`~patchdpo_fast.eval.generate` – ``patchdpo generate``: :func:`generate_dreambench` (resumable, sharded).
* :mod:`~patchdpo_fast.eval.metrics` – DINO / CLIP-I / CLIP-T embeddings and scores (:func:`build_eval_models`,
  :func:`subject_scores`).
* :mod:`~patchdpo_fast.eval.evaluate` – ``patchdpo evaluate``: :func:`evaluate_dreambench`, :func:`write_outputs`.
* :mod:`~patchdpo_fast.eval.report` – markdown table, bar chart and contact sheets (Pillow).

Importing this package loads neither diffusers nor transformers; the commands load them when they run.
"""

from .dreambench import (
    KOSMOS_G_REFERENCE,
    LIVE_CLASSES,
    PAPER_RESULTS,
    DreamBenchItem,
    DreamBenchProtocol,
    DreamBenchSubject,
    LayoutError,
    LayoutReport,
    check_layout,
    find_prompts_file,
    image_path,
    parse_prompts_file,
    prompt_slug,
    reference_images,
    render_prompt,
    selected_reference,
)
from .metrics import EvalModels, build_eval_models, similarity_matrix, subject_scores
from .report import bar_chart, contact_sheet, markdown_report

_LAZY = {
    "evaluate_dreambench": "evaluate",
    "write_outputs": "evaluate",
    "GenerateResult": "generate",
    "generate_dreambench": "generate",
}


def __getattr__(name: str):
    # the command modules load on first use, so ``python -m patchdpo_fast.eval.<command>`` runs them cleanly
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KOSMOS_G_REFERENCE",
    "LIVE_CLASSES",
    "PAPER_RESULTS",
    "DreamBenchItem",
    "DreamBenchProtocol",
    "DreamBenchSubject",
    "EvalModels",
    "GenerateResult",
    "LayoutError",
    "LayoutReport",
    "bar_chart",
    "build_eval_models",
    "check_layout",
    "contact_sheet",
    "evaluate_dreambench",
    "find_prompts_file",
    "generate_dreambench",
    "image_path",
    "markdown_report",
    "parse_prompts_file",
    "prompt_slug",
    "reference_images",
    "render_prompt",
    "selected_reference",
    "similarity_matrix",
    "subject_scores",
    "write_outputs",
]
