"""Reports drawn with Pillow only: the markdown results table, the per-subject bar chart and contact sheets."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ._io import save_png_atomic
from .dreambench import PAPER_RESULTS

__all__ = ["METRICS", "SETTING_TITLES", "bar_chart", "contact_sheet", "markdown_report"]

#: JSON key -> column title, in the paper's column order.
METRICS: tuple[tuple[str, str], ...] = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))

SETTING_TITLES: dict[str, str] = {
    "all": "all reference images per subject",
    "single": "one selected reference image per subject (Kosmos-G setting)",
}

_COLORS = ((66, 114, 196), (237, 125, 49), (112, 173, 71))


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def markdown_report(result: dict[str, Any], label: str = "ours") -> str:
    """The results in the paper's table format (paper rows, then ours), then the per-subject table."""
    setting = result["setting"]
    overall = result["overall"]
    lines = [f"## DreamBench: {SETTING_TITLES.get(setting, setting)}", ""]
    if not result.get("complete_protocol", False):
        sel = result.get("selection", {})
        lines += [
            f"> Partial protocol ({sel.get('num_subjects', '?')} subjects, {result.get('num_images', '?')} images "
            "instead of 30 subjects x 25 prompts): not comparable with the published numbers.",
            "",
        ]
    lines += ["| Method | DINO | CLIP-I | CLIP-T |", "|---|---:|---:|---:|"]
    for method, dino, clip_i, clip_t in PAPER_RESULTS.get(setting, []):
        lines.append(f"| {method} (paper) | {dino:.3f} | {clip_i:.3f} | {clip_t:.3f} |")
    lines.append(
        f"| **{label}** | **{overall['dino']:.3f}** | **{overall['clip_i']:.3f}** | **{overall['clip_t']:.3f}** |"
    )
    lines += ["", "### Per subject", "", "| Subject | Class | Images | References | DINO | CLIP-I | CLIP-T |"]
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for name, s in result["per_subject"].items():
        kind = f"{s['class']} (live)" if s.get("live") else s["class"]
        lines.append(
            f"| {name} | {kind} | {s['num_generated']} | {s['num_references']} | "
            f"{s['dino']:.3f} | {s['clip_i']:.3f} | {s['clip_t']:.3f} |"
        )
    lines += [
        "",
        "Scores: cosine similarities of DINO ViT-S/16 (CLS) and CLIP ViT-B/32 embeddings; DINO / CLIP-I average every "
        "generated image against every reference image of its subject, CLIP-T each generated image against its "
        "prompt; each is averaged per subject, then over subjects.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Bar chart
# ----------------------------------------------------------------------------------------------------------------


def bar_chart(
    result: dict[str, Any], path: str | os.PathLike[str] | None = None, title: str | None = None
) -> Image.Image:
    """Grouped bars (DINO, CLIP-I, CLIP-T) per subject plus the overall mean, 0..1 axis; saved to ``path`` if given.

    Dotted lines mark the best published row of the setting (PatchDPO) in each metric's colour.
    """
    font = _font()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    groups = [(name, s) for name, s in result["per_subject"].items()] + [("overall", result["overall"])]
    bar_w, gap = 10, 14
    group_w = len(METRICS) * bar_w + gap
    label_h = max(_text_size(scratch, name, font)[0] for name, _ in groups) + 10
    left, top, plot_h = 48, 46, 260
    width = max(520, left + 16 + len(groups) * group_w + 10)
    height = top + plot_h + label_h + 10
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    title = title or f"DreamBench per subject ({result['setting']} references)"
    draw.text((left, 6), title, fill="black", font=font)
    # legend
    x = left
    for (_, name), color in zip(METRICS, _COLORS, strict=True):
        draw.rectangle((x, 26, x + 10, 36), fill=color)
        draw.text((x + 14, 25), name, fill="black", font=font)
        x += 24 + _text_size(draw, name, font)[0]
    paper = PAPER_RESULTS.get(result["setting"], [])
    if paper:
        draw.text((x + 6, 25), f"dashed: {paper[-1][0]} (paper)", fill=(90, 90, 90), font=font)
    # axis and grid
    y0 = top + plot_h
    for k in range(6):
        v = k / 5
        y = y0 - round(v * plot_h)
        draw.line((left, y, width - 6, y), fill=(225, 225, 225))
        draw.text((6, y - 6), f"{v:.1f}", fill="black", font=font)
    draw.line((left, top, left, y0), fill="black")
    draw.line((left, y0, width - 6, y0), fill="black")
    if paper:
        best = paper[-1]
        for value, color in zip(best[1:], _COLORS, strict=True):
            y = y0 - round(value * plot_h)
            for xs in range(left, width - 6, 8):
                draw.line((xs, y, xs + 3, y), fill=color)
    # bars and rotated labels
    x = left + 10
    for name, scores in groups:
        for (key, _), color in zip(METRICS, _COLORS, strict=True):
            value = min(max(float(scores[key]), 0.0), 1.0)
            draw.rectangle((x, y0 - round(value * plot_h), x + bar_w - 2, y0), fill=color)
            x += bar_w
        tw, th = _text_size(draw, name, font)
        label = Image.new("RGB", (tw + 4, th + 6), "white")
        ImageDraw.Draw(label).text((2, 0), name, fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (x - len(METRICS) * bar_w + (len(METRICS) * bar_w - label.width) // 2, y0 + 4))
        x += gap
    if path is not None:
        _save_png(img, path)
    return img


# ----------------------------------------------------------------------------------------------------------------
# Contact sheets
# ----------------------------------------------------------------------------------------------------------------


def _thumb(image: Image.Image, size: int) -> Image.Image:
    img = image.convert("RGB")
    scale = size / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (240, 240, 240))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if _text_size(draw, text, font)[0] <= width:
        return text
    while text and _text_size(draw, text + "...", font)[0] > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(
    references: Sequence[Image.Image | str | os.PathLike],
    generated: Sequence[tuple[str, Image.Image | str | os.PathLike]],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "",
    thumb: int = 128,
    columns: int = 5,
) -> Image.Image:
    """References (top row) and generations (captioned grid below) side by side; saved to ``path`` if given.

    Args:
        references: the subject's reference images (PIL or paths).
        generated: ``(caption, image)`` pairs, e.g. ``(prompt, path)``.
        thumb: thumbnail side in pixels.
        columns: generations per row (the reference row widens the sheet if it has more images).
    """
    font = _font()
    pad, cap_h, head_h = 6, 14, 18

    def load(x: Any) -> Image.Image:
        if isinstance(x, Image.Image):
            return x
        with Image.open(x) as img:
            return img.convert("RGB")

    cols = max(columns, len(references), 1)
    rows = math.ceil(len(generated) / columns) if generated else 0
    width = pad + cols * (thumb + pad)
    height = head_h + (head_h + thumb + pad) + rows * (thumb + cap_h + pad) + (head_h if generated else 0) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 3), _fit(draw, title, font, width - 2 * pad), fill="black", font=font)
    y = head_h
    draw.text((pad, y + 2), f"references ({len(references)})", fill=(90, 90, 90), font=font)
    y += head_h
    for i, ref in enumerate(references):
        sheet.paste(_thumb(load(ref), thumb), (pad + i * (thumb + pad), y))
    y += thumb + pad
    if generated:
        draw.text((pad, y + 2), f"generated ({len(generated)})", fill=(90, 90, 90), font=font)
        y += head_h
    for k, (caption, image) in enumerate(generated):
        r, c = divmod(k, columns)
        x0, y0 = pad + c * (thumb + pad), y + r * (thumb + cap_h + pad)
        sheet.paste(_thumb(load(image), thumb), (x0, y0))
        draw.text((x0, y0 + thumb + 1), _fit(draw, caption, font, thumb), fill="black", font=font)
    if path is not None:
        _save_png(sheet, path)
    return sheet


def _save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    return save_png_atomic(image, path)
