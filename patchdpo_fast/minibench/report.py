"""The minibench report: the table laid out like the paper's, the sanity checks, a sample grid and a bar chart.

Numbers are means and standard deviations over the finetuning seeds (for a seed, every model starts its samples
from the same noise, so the per-seed differences to the base model are reported too). Figures are drawn with
Pillow only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from patchdpo_fast.minibench.metrics import METRICS
from patchdpo_fast.utils import atomic_write_json, atomic_write_text

__all__ = ["publish", "write_report"]

_TABLE = ("id_sim", "detail_acc", "prompt_acc", "id_acc", "global_acc", "subject_l1")
_BARS = ("id_sim", "detail_acc", "prompt_acc", "id_acc")
_COLORS = ((66, 114, 196), (237, 125, 49), (112, 173, 71), (165, 105, 189))


def _aggregate(models: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{"name/seedK": summary}`` -> ``{name: {metric: {"mean", "std", "n"}}}`` (std over seeds, ddof 1)."""
    by_name: dict[str, list[dict[str, float]]] = {}
    for key, summary in models.items():
        by_name.setdefault(key.rsplit("/", 1)[0], []).append(summary)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, rows in by_name.items():
        out[name] = {}
        for metric in rows[0]:
            values = np.array([r[metric] for r in rows], dtype=np.float64)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            out[name][metric] = {"mean": float(values.mean()), "std": std, "n": len(values)}
    return out


def _deltas(models: dict[str, dict[str, float]], baseline: str) -> dict[str, dict[str, dict[str, float]]]:
    """Per-seed differences to ``baseline`` (same noise per seed), mean and std over seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, summary in models.items():
        name, seed = key.rsplit("/", 1)
        base = models.get(f"{baseline}/{seed}")
        if base is None or name == baseline:
            continue
        out.setdefault(name, {})
        for metric, value in summary.items():
            out[name].setdefault(metric, []).append(value - base[metric])  # type: ignore[arg-type]
    return {
        name: {
            m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}
            for m, v in metrics.items()
        }
        for name, metrics in out.items()
    }


def _significant(stat: dict[str, float]) -> int:
    """+1 / -1 when a paired mean difference is at least two standard errors away from 0 (n >= 3), else 0."""
    n = stat.get("n", 1)
    if n < 3:
        return 0
    se = stat["std"] / np.sqrt(n)
    if abs(stat["mean"]) <= 2 * se or stat["mean"] == 0:
        return 0
    return 1 if stat["mean"] > 0 else -1


def _delta_cell(stat: dict[str, float], higher_is_better: bool) -> str:
    sign = _significant(stat)
    mark = "" if sign == 0 else (" (+)" if (sign > 0) == higher_is_better else " (−)")
    return f"{stat['mean']:+.3f} ± {stat['std']:.3f}{mark}"


def _cell(stat: dict[str, float], bold: bool = False) -> str:
    text = f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat.get("n", 2) > 1 else f"{stat['mean']:.3f}"
    return f"**{text}**" if bold else text


def _table(rows: list[tuple[str, str]], agg: dict[str, Any]) -> list[str]:
    head = "| Method | " + " | ".join(
        f"{METRICS[m][0]}{f' ({METRICS[m][1]})' if METRICS[m][1] else ''}{'' if METRICS[m][2] else ' ↓'}"
        for m in _TABLE
    )
    lines = [head + " |", "|---|" + "---:|" * len(_TABLE)]
    best = {}
    for m in _TABLE:
        values = [agg[name][m]["mean"] for name, _ in rows if name in agg]
        best[m] = (max if METRICS[m][2] else min)(values) if values else None
    for name, label in rows:
        if name not in agg:
            continue
        cells = [_cell(agg[name][m], bold=agg[name][m]["mean"] == best[m]) for m in _TABLE]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _sanity(
    bench: Any, agg: dict[str, Any], models: dict[str, Any], info: dict[str, Any]
) -> tuple[list[str], dict[str, Any]]:
    lines, checks = [], {}
    judges = info.get("judges", {}).get("sanity", {})
    if judges:
        ok = (
            judges["retrieval_accuracy"] > 0.9
            and judges["own_reference_similarity"] > judges["other_reference_similarity"]
        )
        checks["judges_know_subjects"] = ok
        lines.append(
            f"- {'PASS' if ok else 'FAIL'} — the identity judge ranks a subject's own clean renders far above other "
            f"subjects': retrieval accuracy {judges['retrieval_accuracy']:.3f} among the held-out subjects, "
            f"identity accuracy {judges['id_acc']:.3f}, similarity to own reference "
            f"{judges['own_reference_similarity']:.3f} vs {judges['other_reference_similarity']:.3f} to others; "
            f"scene accuracy {judges['prompt_acc']:.3f} "
            f"(fresh renders, backgrounds never seen in training)."
        )
    if "untrained" in agg and "base" in agg:
        u, b = agg["untrained"], agg["base"]
        ok = b["id_acc"]["mean"] > u["id_acc"]["mean"] and b["id_sim"]["mean"] > u["id_sim"]["mean"]
        checks["pretrained_beats_untrained"] = ok
        lines.append(
            f"- {'PASS' if ok else 'FAIL'} — the pretrained model beats the untrained one on held-out identity: "
            f"ID-acc {b['id_acc']['mean']:.3f} vs {u['id_acc']['mean']:.3f} (chance "
            f"{1 / len(bench.world.heldout_subjects):.3f}), ID-sim {b['id_sim']['mean']:.3f} vs "
            f"{u['id_sim']['mean']:.3f}."
        )
    for control, correct, what in (
        ("ddpo_swapped", "ddpo", "Diffusion-DPO with winners and losers swapped"),
        ("pwmse_oracle_flipped", "pwmse_oracle", "official PatchDPO with its oracle maps rotated by 180 degrees"),
    ):
        diff = _deltas({k: v for k, v in models.items() if k.rsplit("/", 1)[0] in (control, correct)}, correct)
        if control not in diff:
            continue
        keys = ("id_sim", "detail_acc", "id_acc")
        signs = {m: _significant(diff[control][m]) for m in keys}
        worse, better = sum(v < 0 for v in signs.values()), sum(v > 0 for v in signs.values())
        verdict = "PASS" if worse >= 2 and not better else ("FAIL" if better else "INCONCLUSIVE")
        checks[f"{control}_is_worse"] = verdict
        lines.append(
            f"- {verdict} — {what} against the correct run, per-seed paired differences (control minus correct, "
            "mean ± std; a difference counts when it is at least two standard errors from 0): "
            + ", ".join(
                f"{METRICS[m][0]} {diff[control][m]['mean']:+.3f} ± {diff[control][m]['std']:.3f}" for m in keys
            )
            + (". Worse on " + f"{worse} of 3." if verdict != "INCONCLUSIVE" else "; within the seed noise.")
        )
    quality = info.get("quality", {})
    if quality:

        def f3(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        lines.append(
            f"- estimator ({quality.get('estimator', '?')}) vs oracle maps on the {quality['pairs']} pairs: "
            f"Pearson r = {f3(quality['estimator_vs_oracle_pearson'])}; AUROC of the estimator for the patches the "
            f"oracle calls bad (q < 0.5, {quality['oracle_bad_patch_fraction']:.1%} of patches): "
            f"{f3(quality['estimator_auroc_on_oracle_bad_patches'])}."
        )
        if quality.get("subject_patch_fraction") is not None:
            lines.append(
                f"- on the subject's patches only ({quality['subject_patch_fraction']:.1%} of patches; the oracle "
                f"calls {f3(quality['subject_oracle_bad_fraction'])} of them bad, "
                f"{f3(quality['background_oracle_bad_fraction'])} of background patches): Pearson r = "
                f"{f3(quality['subject_estimator_vs_oracle_pearson'])}, AUROC "
                f"{f3(quality['subject_estimator_auroc_on_oracle_bad_patches'])}; mean estimated quality "
                f"{f3(quality['subject_estimator_mean_quality'])} on the subject and "
                f"{f3(quality['background_estimator_mean_quality'])} on the background (oracle: "
                f"{f3(quality['subject_oracle_mean_quality'])} and {f3(quality['background_oracle_mean_quality'])})."
            )
    return lines, checks


def _font() -> Any:
    return ImageFont.load_default()


def _sample_grid(bench: Any, names: list[tuple[str, str]], path: Path, seed: int) -> Path | None:
    """Rows: held-out subjects (one evaluation scene each); columns: reference, then each model's sample."""
    from safetensors.torch import load_file

    world = bench.world
    scenes = world.eval_scenes()
    per_subject = len(scenes) * bench.settings.eval.samples_per_prompt
    columns: list[tuple[str, torch.Tensor]] = []
    for name, label in names:
        file = bench.path("eval", name, f"seed{seed}", "samples.safetensors")
        if file.is_file():
            columns.append((label, load_file(str(file))["images"]))
    if not columns:
        return None
    rows = world.heldout_subjects[:8]
    cell, pad, label_h = 3 * world.resolution, 4, 14
    left = 0
    width = (len(columns) + 1) * (cell + pad) + pad
    height = label_h * 3 + len(rows) * (cell + pad) + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    titles = [("reference", "")] + [(label, "") for label, _ in columns]
    for c, (title, _) in enumerate(titles):
        x = left + pad + c * (cell + pad)
        for k, w in enumerate(_wrap(draw, title, font, cell)[:3]):
            draw.text((x, 2 + k * label_h), w, fill="black", font=font)
    for r, subject in enumerate(rows):
        si = world.heldout_subjects.index(subject)
        scene_i = r % len(scenes)
        index = si * per_subject + scene_i * bench.settings.eval.samples_per_prompt
        y = label_h * 3 + pad + r * (cell + pad)
        ref = (world.render_reference(subject).image * 255 + 0.5).clip(0, 255).astype(np.uint8)
        img.paste(Image.fromarray(ref).resize((cell, cell), Image.NEAREST), (left + pad, y))
        for c, (_, images) in enumerate(columns):
            tile = images[index].permute(1, 2, 0).numpy()
            img.paste(
                Image.fromarray(tile).resize((cell, cell), Image.NEAREST), (left + pad + (c + 1) * (cell + pad), y)
            )
    from patchdpo_fast.data.files import save_image_atomic

    return save_image_atomic(img, path)


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines no wider than ``width`` pixels (a longer word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textbbox((0, 0), f"{lines[-1]} {word}", font=font)[2] <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _bar_chart(agg: dict[str, Any], rows: list[tuple[str, str]], path: Path) -> Path:
    """Grouped bars (one group per model, one bar per metric) with +-1 std whiskers, axis 0..1."""
    from patchdpo_fast.data.files import save_image_atomic

    font = _font()
    rows = [(n, lbl) for n, lbl in rows if n in agg]
    bar_w, gap, left, top, plot_h = 14, 22, 44, 40, 260
    group_w = len(_BARS) * bar_w + gap
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_h = max(scratch.textbbox((0, 0), n, font=font)[2] for n, _ in rows) + 12
    width = left + 20 + len(rows) * group_w
    height = top + plot_h + label_h
    img = Image.new("RGB", (max(width, 420), height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 4), "minibench: held-out subjects (mean ± std over seeds)", fill="black", font=font)
    x = left
    for m, color in zip(_BARS, _COLORS, strict=True):
        draw.rectangle((x, 22, x + 10, 32), fill=color)
        draw.text((x + 14, 21), METRICS[m][0], fill="black", font=font)
        x += 30 + scratch.textbbox((0, 0), METRICS[m][0], font=font)[2]
    y0 = top + plot_h
    for k in range(6):
        y = y0 - round(k / 5 * plot_h)
        draw.line((left, y, img.width - 6, y), fill=(225, 225, 225))
        draw.text((6, y - 6), f"{k / 5:.1f}", fill="black", font=font)
    draw.line((left, top, left, y0), fill="black")
    x = left + 10
    for name, _ in rows:
        for m, color in zip(_BARS, _COLORS, strict=True):
            mean, std = agg[name][m]["mean"], agg[name][m]["std"]
            draw.rectangle((x, y0 - round(min(max(mean, 0), 1) * plot_h), x + bar_w - 3, y0), fill=color)
            cx = x + (bar_w - 3) // 2
            lo, hi = y0 - round(min(max(mean - std, 0), 1) * plot_h), y0 - round(min(max(mean + std, 0), 1) * plot_h)
            draw.line((cx, lo, cx, hi), fill="black")
            x += bar_w
        tw = scratch.textbbox((0, 0), name, font=font)
        label = Image.new("RGB", (tw[2] + 4, tw[3] + 6), "white")
        ImageDraw.Draw(label).text((2, 0), name, fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (x - len(_BARS) * bar_w + (len(_BARS) * bar_w - label.width) // 2, y0 + 4))
        x += gap
    return save_image_atomic(img, path)


def _split_sentence(bench: Any) -> str:
    """Which training subjects the pre-training saw and which ones the pairs were built on."""
    pretrain, pairs = bench.subject_split()
    if bench.settings.world.pair_only_subjects == 0:
        return f"Pre-training and pairs: the same {len(pretrain)} training subjects."
    return (
        f"Pre-training on {len(pretrain)} training subjects; pairs built on {len(pairs)} other training subjects the "
        "pre-training never saw (`--pair-only-subjects`)."
    )


def write_report(bench: Any) -> dict[str, Any]:
    """Write ``results.json``, ``report.md``, ``samples_grid.png`` and ``metrics_bars.png`` into the run folder."""
    infos = {}
    for stage in ("world", "judges", "pretrain", "pairs", "quality", "finetune", "evaluate"):
        marker = bench.path("stages", f"{stage}.json")
        if marker.is_file():
            infos[stage] = json.loads(marker.read_text(encoding="utf-8"))
    if "quality" in infos and "subject_patch_fraction" not in infos["quality"]:
        infos["quality"].update(bench.map_agreement())  # a run whose quality stage predates the by-region figures
    models = infos["evaluate"]["models"]
    agg = _aggregate(models)
    deltas = _deltas(models, "base")
    variants = bench.settings.variants()
    main_rows = [("base", "IP-Adapter-Plus (mini, pretrained)")] + [
        (v.name, v.label) for v in variants if v.control is None
    ]
    control_rows = [(v.name, v.label) for v in variants if v.control is not None]
    reference_rows = [("untrained", "untrained (random init)")]
    sanity_lines, checks = _sanity(bench, agg, models, infos)
    seeds = bench.settings.finetune.seeds
    s = bench.settings
    lines = [
        "# minibench: PatchDPO's comparison in a miniature world",
        "",
        f"Held-out subjects: {len(bench.world.heldout_subjects)} (never seen before evaluation), "
        f"{len(bench.world.eval_scenes())} evaluation prompts, {s.eval.samples_per_prompt} sample(s) each, "
        f"{s.eval.sampler_steps} DDIM steps, guidance {s.eval.guidance}. Mean ± std over {len(seeds)} finetuning "
        f"seed(s) {list(seeds)}; for a seed every model starts from the same noise. Finetuning: {s.finetune.steps} "
        f"steps x {s.finetune.pairs_per_batch} pairs, lr {s.finetune.lr}, beta {s.finetune.beta} (DPO losses), only "
        "the IP K/V projections train (the paper's recipe). " + _split_sentence(bench),
        "",
        "Columns: ID-sim = identity-embedding cosine to the subject's reference (DINO analogue); Detail-acc = pattern, "
        "pattern colour and emblem read correctly (the local detail PatchDPO targets; CLIP-I analogue); Prompt-acc = "
        "background, position and scale as prompted (CLIP-T analogue); ID-acc = subject classified correctly among the "
        "held-out subjects; Global-acc = shape and body colour; Subject-L1 = mean absolute error against the "
        "renderer's ground truth on the subject's pixels (lower is better). Bold: best in the column.",
        "",
        "## Results",
        "",
        *_table(main_rows, agg),
        "",
        "### Controls (deliberate bugs) and the untrained model",
        "",
        *_table(reference_rows + control_rows, agg),
        "",
        "### Per-seed difference to the base model (same noise), mean ± std",
        "",
        "(+) / (−): better / worse than the base model by at least two standard errors of the paired difference.",
        "",
        "| Method | " + " | ".join(METRICS[m][0] for m in _TABLE) + " |",
        "|---|" + "---:|" * len(_TABLE),
    ]
    for name, label in main_rows[1:] + control_rows:
        if name in deltas:
            lines.append(
                f"| {label} | " + " | ".join(_delta_cell(deltas[name][m], METRICS[m][2]) for m in _TABLE) + " |"
            )
    lines += ["", "## Sanity checks", "", *sanity_lines, ""]
    grid = _sample_grid(bench, main_rows, bench.path("samples_grid.png"), seeds[0])
    _bar_chart(agg, main_rows + control_rows, bench.path("metrics_bars.png"))
    if grid is not None:
        lines += ["## Samples", "", f"![held-out references and samples (seed {seeds[0]})](samples_grid.png)", ""]
    lines += ["![metrics](metrics_bars.png)", ""]
    timing = {k: v.get("seconds") for k, v in infos.items()}
    lines += ["## Stage times (s)", "", "| " + " | ".join(timing) + " |", "|" + "---:|" * len(timing)]
    lines += ["| " + " | ".join(f"{v:.0f}" if v is not None else "-" for v in timing.values()) + " |", ""]
    results = {
        "settings": s.to_dict(),
        "aggregate": agg,
        "delta_vs_base": deltas,
        "checks": checks,
        "stage_seconds": timing,
        "models": models,
        "quality": infos.get("quality"),
        "judges": infos.get("judges"),
    }
    atomic_write_json(bench.path("results.json"), results)
    atomic_write_text(bench.path("report.md"), "\n".join(lines))
    return {"checks": checks, "report": str(bench.path("report.md"))}


def publish(bench: Any, folder: str | Path) -> Path:
    """Copy the report, the results and the figures to ``folder`` (e.g. ``benchmarks/results/minibench``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "results.json", "samples_grid.png", "metrics_bars.png"):
        src = bench.path(name)
        if src.is_file():
            shutil.copyfile(src, folder / name)
    return folder
