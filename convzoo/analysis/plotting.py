"""Figures with Pillow only: a colormap, heatmap panels side by side with titles, a colour bar,
and sampling points drawn over an image."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Anchors of a dark-to-bright sequential colormap (black, indigo, crimson, orange, pale yellow):
# monotone in lightness, so the hot centre of an ERF reads as the brightest region in print too.
_ANCHORS = np.array(
    [
        [0.00, 0, 0, 4],
        [0.25, 66, 10, 104],
        [0.50, 188, 55, 84],
        [0.75, 249, 142, 9],
        [1.00, 252, 255, 164],
    ],
    dtype=np.float64,
)

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def colormap(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """Map values in [0, 1] (any shape, clipped) to uint8 RGB colours: shape + (3,)."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(values, _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def font(size: int = 14) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels (its bitmap font when FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, text_font) -> Tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=text_font)
    return right - left, bottom - top


def heatmap_image(scores: np.ndarray | torch.Tensor, size: int) -> Image.Image:
    """An RGB ``size`` x ``size`` (longest side) picture of the (H, W) ``scores`` in [0, 1]."""
    scores = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    height, width = scores.shape
    scale = size / max(height, width)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
    return Image.fromarray(colormap(scores), "RGB").resize(target, resample)


def colorbar(width: int, height: int = 12) -> Image.Image:
    """A horizontal bar from 0 (left) to 1 (right) in the colormap."""
    ramp = np.tile(np.linspace(0.0, 1.0, width), (height, 1))
    return Image.fromarray(colormap(ramp), "RGB")


def panels_figure(
    panels: Sequence[Tuple[Image.Image, str, Sequence[str]]],
    legend: Optional[str] = None,
    padding: int = 12,
    title_size: int = 16,
    caption_size: int = 12,
) -> Image.Image:
    """Pictures side by side, each with a title above and caption lines below, and an optional
    colour bar with ``legend`` under the row. ``panels``: (picture, title, caption lines)."""
    if not panels:
        raise ValueError("panels_figure needs at least one panel")
    title_font, caption_font = font(title_size), font(caption_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = max(_text_size(probe, t or " ", title_font)[1] for _, t, _ in panels) + padding // 2
    line_h = _text_size(probe, "Ag", caption_font)[1] + 4
    caption_h = max(len(c) for _, _, c in panels) * line_h
    widths = [max(p.width, *(_text_size(probe, s, caption_font)[0] for s in list(c) + [t])) for p, t, c in panels]
    body_h = max(p.height for p, _, _ in panels)
    bar_h = (12 + line_h + padding) if legend is not None else 0
    width = sum(widths) + padding * (len(panels) + 1)
    height = padding + title_h + body_h + padding // 2 + caption_h + bar_h + padding
    figure = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    x = padding
    for (picture, title, caption), column in zip(panels, widths):
        title_w = _text_size(draw, title, title_font)[0]
        draw.text((x + (column - title_w) // 2, padding), title, fill=TEXT, font=title_font)
        top = padding + title_h
        figure.paste(picture, (x + (column - picture.width) // 2, top))
        y = top + body_h + padding // 2
        for line in caption:
            draw.text((x, y), line, fill=TEXT, font=caption_font)
            y += line_h
        x += column + padding
    if legend is not None:
        zero_w, one_w = _text_size(draw, "0", caption_font)[0], _text_size(draw, "1", caption_font)[0]
        bar_w = max(16, min(width - 2 * padding - zero_w - one_w - 8, 320))
        y = height - padding - 12 - line_h
        draw.text((padding, y), legend, fill=TEXT, font=caption_font)
        draw.text((padding, y + line_h - 2), "0", fill=TEXT, font=caption_font)
        figure.paste(colorbar(bar_w), (padding + zero_w + 4, y + line_h))
        draw.text((padding + zero_w + 8 + bar_w, y + line_h - 2), "1", fill=TEXT, font=caption_font)
    return figure


def draw_points(
    image: Image.Image,
    centres: Sequence[Tuple[float, float]],
    samples: Sequence[np.ndarray],
    weights: Sequence[Optional[np.ndarray]],
) -> Image.Image:
    """Draw, for each output point, its centre (a white-ringed cross) and the (K, 2) (y, x)
    sampling locations as dots whose size and colour follow their weight in [0, 1]."""
    picture = image.convert("RGB").copy()
    draw = ImageDraw.Draw(picture)
    radius = max(2, round(min(picture.size) / 120))
    palette = _point_colours(len(centres))
    for (cy, cx), points, weight, colour in zip(centres, samples, weights, palette):
        if weight is None:
            weight = np.ones(len(points))
        peak = float(np.max(weight)) if len(weight) and np.max(weight) > 0 else 1.0
        for (py, px), value in zip(points, weight):
            if not (np.isfinite(py) and np.isfinite(px)):
                continue
            r = radius * (0.5 + 0.8 * float(value) / peak)
            draw.line([(cx, cy), (px, py)], fill=colour, width=1)
            draw.ellipse([px - r, py - r, px + r, py + r], fill=colour, outline=(0, 0, 0))
        size = radius * 2.5
        draw.line([(cx - size, cy), (cx + size, cy)], fill=(255, 255, 255), width=3)
        draw.line([(cx, cy - size), (cx, cy + size)], fill=(255, 255, 255), width=3)
        draw.line([(cx - size, cy), (cx + size, cy)], fill=colour, width=1)
        draw.line([(cx, cy - size), (cx, cy + size)], fill=colour, width=1)
    return picture


def _point_colours(count: int) -> List[Tuple[int, int, int]]:
    base = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60)]
    return [base[i % len(base)] for i in range(count)]


def bar_chart(labels: Sequence[str], values: Sequence[Sequence[float]], title: str, unit: str,
              bar_width: int = 90, height: int = 260, padding: int = 16) -> Image.Image:
    """Vertical bars of the mean of each ``values[i]`` (one list of runs per label), every run
    drawn as a dot on its bar, the mean written above; the axis starts at 0."""
    if not labels or len(labels) != len(values) or any(len(v) == 0 for v in values):
        raise ValueError("bar_chart needs one non-empty list of values per label")
    title_font, text_font = font(15), font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag", text_font)[1] + 4
    label_lines = [_wrap(label, text_font, bar_width + padding - 4, probe) for label in labels]
    label_h = max(len(lines) for lines in label_lines) * line_h
    top_h = _text_size(probe, title, title_font)[1] + line_h + 2 * padding
    width = max(len(labels) * (bar_width + padding) + 3 * padding, _text_size(probe, title, title_font)[0] + 2 * padding)
    figure = Image.new("RGB", (width, top_h + height + label_h + 2 * padding), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    draw.text((padding, padding), title, fill=TEXT, font=title_font)
    peak = max(max(v) for v in values) or 1.0
    base = top_h + height
    draw.line([(padding, base), (width - padding, base)], fill=TEXT, width=1)
    colours = _point_colours(len(labels))
    for k, (label, runs, colour) in enumerate(zip(labels, values, colours)):
        left = 2 * padding + k * (bar_width + padding)
        mean = sum(runs) / len(runs)
        bar_top = base - round(height * mean / peak)
        draw.rectangle([left, bar_top, left + bar_width, base], fill=colour)
        for run in runs:
            y = base - height * run / peak
            draw.ellipse([left + bar_width / 2 - 3, y - 3, left + bar_width / 2 + 3, y + 3], fill=(0, 0, 0))
        text = f"{mean:.1f}{unit}"
        draw.text((left + (bar_width - _text_size(draw, text, text_font)[0]) // 2, bar_top - line_h), text, fill=TEXT, font=text_font)
        for i, line in enumerate(label_lines[k]):
            draw.text((left, base + padding // 2 + i * line_h), line, fill=TEXT, font=text_font)
    return figure


def _wrap(text: str, text_font, width: int, draw: ImageDraw.ImageDraw) -> List[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a long word stays whole)."""
    lines: List[str] = []
    for word in text.split():
        if lines and _text_size(draw, lines[-1] + " " + word, text_font)[0] <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]
