"""Plots drawn with PIL (matplotlib is not a dependency): round ticks, a font, framed axes, line charts.

    from tokscale.plot import Series, line_chart
    img = line_chart([{"series": [Series("PSNR", [8, 16, 32], [14.2, 16.0, 18.1])], "xlabel": "prefix t",
                       "ylabel": "PSNR (dB)", "log2_x": True}], title="coarse-to-fine")
    img.save("curve.png")

``tokscale probe``'s trade-off scatter (tokscale.jobs.probe_cli) and ``tokscale eval prefixes``' curve
(tokscale.tokenizers.prefix_eval) share the axes drawn here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")  # fmt: skip


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k apart) covering [lo, hi]; a single value gets a span around it."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def tick_label(value: float, step: float) -> str:
    """``value`` with as many decimals as the tick step needs (0.25 steps: 2, 2.5 steps: 1, 5 steps: 0)."""
    decimals = next((d for d in range(7) if abs(round(step, d) - step) <= 1e-9 * max(1.0, step)), 6)
    return f"{value:.{decimals}f}"


def font(size: int):
    """DejaVu Sans at ``size`` px when installed, else PIL's default font."""
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        with contextlib.suppress(OSError):
            return ImageFont.truetype(name, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def draw_axes(
    img,
    draw,
    box: tuple[float, float, float, float],
    xt: Sequence[float],
    yt: Sequence[float],
    xlabel: str,
    ylabel: str,
    fonts: tuple,
    xtick_labels: Sequence[str] | None = None,
    xlim: tuple[float, float] | None = None,
) -> Callable[[float, float], tuple[float, float]]:
    """Grid, ticks and their labels, the frame and both axis labels (the y label rotated) of one panel in
    ``box`` (left, top, right, bottom); ``fonts`` = (axis font, tick font). The axes span the first to the last
    tick (``xlim`` widens the x axis beyond them); ``xtick_labels`` replace the x ticks' numbers. Returns the
    mapping from data (x, y) to pixels."""
    from PIL import Image, ImageDraw

    f_axis, f_tick = fonts
    left, top, right, bottom = box
    x0, x1 = xlim if xlim is not None else (xt[0], xt[-1])
    y0, y1 = yt[0], yt[-1]

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for i, t in enumerate(xt):  # grid, ticks and their labels
        x, _ = px(t, y0)
        text = xtick_labels[i] if xtick_labels is not None else tick_label(t, xt[1] - xt[0])
        draw.line([(x, top), (x, bottom)], fill="#e6e6e6")
        draw.line([(x, bottom), (x, bottom + 6)], fill="black", width=2)
        draw.text((x, bottom + 10), text, fill="black", font=f_tick, anchor="ma")
    for t in yt:
        _, y = px(x0, t)
        draw.line([(left, y), (right, y)], fill="#e6e6e6")
        draw.line([(left - 6, y), (left, y)], fill="black", width=2)
        draw.text((left - 10, y), tick_label(t, yt[1] - yt[0]), fill="black", font=f_tick, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black", width=2)
    draw.text(((left + right) / 2, bottom + 34), xlabel, fill="black", font=f_axis, anchor="ma")
    label = Image.new("RGB", (int(draw.textlength(ylabel, font=f_axis)) + 8, 24), "white")
    ImageDraw.Draw(label).text((4, 2), ylabel, fill="black", font=f_axis)
    rotated = label.rotate(90, expand=True)
    img.paste(rotated, (left - 80, int((top + bottom) / 2 - rotated.height / 2)))
    return px


@dataclass
class Series:
    """One line of a line chart: its legend name and its points (a None y leaves a gap)."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]


def _span(values: list[float]) -> list[float]:
    """Round ticks with 8 % room on each side of the values."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or abs(lo) * 0.1 or 1.0
    return nice_ticks(lo - pad, hi + pad)


def line_panel(
    img, draw, box, series: Sequence[Series], xlabel: str, ylabel: str, fonts: tuple, log2_x: bool = False
) -> None:
    """Lines with a disc at every point and a legend in a row above the panel. ``log2_x``: a log2 x axis
    ticked at the series' x values (prefix lengths 1, 2, 4, ... 128)."""
    f_axis, f_tick = fonts
    fx = (lambda v: math.log2(v)) if log2_x else (lambda v: float(v))  # noqa: E731
    xs = sorted({float(x) for s in series for x in s.xs}) or [0.0, 1.0]
    ys = [float(y) for s in series for y in s.ys if y is not None and math.isfinite(y)] or [0.0, 1.0]
    if log2_x:
        xt = [fx(x) for x in xs]
        labels = [f"{x:g}" for x in xs]
        pad = 0.25 * max(xt[-1] - xt[0], 1.0) / max(len(xt), 1)
        xlim = (xt[0] - pad, xt[-1] + pad)
    else:
        xt, labels, xlim = _span(xs), None, None
    px = draw_axes(img, draw, box, xt, _span(ys), xlabel, ylabel, fonts, labels, xlim)
    if not any(s.xs for s in series):
        left, top, right, bottom = box
        draw.text(((left + right) / 2, (top + bottom) / 2), "no values", fill="#888888", font=f_axis,
                  anchor="mm")  # fmt: skip
        return
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        points = [px(fx(x), float(y)) for x, y in zip(s.xs, s.ys) if y is not None and math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for cx, cy in points:
            draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=colour, outline="black", width=1)
    x, y = box[0], box[1] - 22  # the legend: one row above the frame, where it covers no point
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        draw.line([(x, y + 7), (x + 22, y + 7)], fill=colour, width=3)
        draw.text((x + 28, y), s.name, fill="black", font=f_tick)
        x += 28 + draw.textlength(s.name, font=f_tick) + 24


def line_chart(panels: Sequence[dict], title: str, caption: str = "", panel_size=(620, 460)):
    """A PIL image of panels side by side, each a :func:`line_panel`: a dict with ``series``, ``xlabel``,
    ``ylabel`` and optionally ``log2_x``."""
    from PIL import Image, ImageDraw

    pw, ph = panel_size
    width, height = 110 + len(panels) * (pw + 110), ph + 200
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    f_title, f_axis, f_tick = font(22), font(16), font(13)
    draw.text((width // 2, 18), title, fill="black", font=f_title, anchor="ma")
    if caption:
        draw.text((width // 2, height - 14), caption, fill="#555555", font=f_tick, anchor="md")
    for i, panel in enumerate(panels):
        left = 110 + i * (pw + 110)
        box = (left, 80, left + pw, 80 + ph)
        line_panel(img, draw, box, panel["series"], panel["xlabel"], panel["ylabel"], (f_axis, f_tick),
                   panel.get("log2_x", False))  # fmt: skip
    return img
