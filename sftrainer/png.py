"""Line charts (and a bar chart) as PNG files, in pure Python (zlib + struct): no plotting library to install.

``write_charts(path, charts)`` draws the charts side by side; each chart is a title and a list of
series ``(label, (r, g, b), [(x, y), ...])``. Axes carry tick labels in a small bitmap font; series
with few points are also drawn as dots (an eval curve of a handful of evaluations stays visible).
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Sequence

RGB = tuple[int, int, int]
Series = tuple[str, RGB, Sequence[tuple[float, float]]]

# 3x5 glyphs, one string per row ('#' = ink). Unknown characters are drawn as a space.
FONT = {
    '0': ['###', '#.#', '#.#', '#.#', '###'],
    '1': ['.#.', '##.', '.#.', '.#.', '###'],
    '2': ['###', '..#', '###', '#..', '###'],
    '3': ['###', '..#', '###', '..#', '###'],
    '4': ['#.#', '#.#', '###', '..#', '..#'],
    '5': ['###', '#..', '###', '..#', '###'],
    '6': ['###', '#..', '###', '#.#', '###'],
    '7': ['###', '..#', '..#', '..#', '..#'],
    '8': ['###', '#.#', '###', '#.#', '###'],
    '9': ['###', '#.#', '###', '..#', '###'],
    '.': ['...', '...', '...', '...', '.#.'],
    '-': ['...', '...', '###', '...', '...'],
    '+': ['...', '.#.', '###', '.#.', '...'],
    '/': ['..#', '..#', '.#.', '#..', '#..'],
    '(': ['.#.', '#..', '#..', '#..', '.#.'],
    ')': ['.#.', '..#', '..#', '..#', '.#.'],
    '_': ['...', '...', '...', '...', '###'],
    'a': ['...', '##.', '..#', '###', '###'],
    'c': ['...', '###', '#..', '#..', '###'],
    'd': ['..#', '..#', '###', '#.#', '###'],
    'e': ['...', '###', '###', '#..', '###'],
    'g': ['...', '###', '#.#', '###', '..#'],
    'h': ['#..', '#..', '###', '#.#', '#.#'],
    'i': ['.#.', '...', '.#.', '.#.', '.#.'],
    'k': ['#..', '#.#', '##.', '#.#', '#.#'],
    'l': ['##.', '.#.', '.#.', '.#.', '###'],
    'm': ['...', '###', '###', '#.#', '#.#'],
    'n': ['...', '##.', '#.#', '#.#', '#.#'],
    'o': ['...', '###', '#.#', '#.#', '###'],
    'p': ['...', '###', '#.#', '###', '#..'],
    'r': ['...', '#.#', '##.', '#..', '#..'],
    's': ['...', '###', '##.', '..#', '###'],
    't': ['.#.', '###', '.#.', '.#.', '.##'],
    'u': ['...', '#.#', '#.#', '#.#', '###'],
    'v': ['...', '#.#', '#.#', '#.#', '.#.'],
    'y': ['...', '#.#', '###', '..#', '###'],
    'x': ['...', '#.#', '.#.', '.#.', '#.#'],
}  # fmt: skip
SCALE = 2  # font pixels per glyph pixel
CHAR_W, CHAR_H = 4 * SCALE, 5 * SCALE

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (40, 40, 40), (120, 120, 120), (225, 225, 225)
BAR, MARK = (70, 130, 180), (200, 60, 40)  # histogram bars; a limit line


class Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(WHITE) * (width * height))

    def dot(self, x: int, y: int, color: RGB) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: RGB) -> None:
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                self.dot(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: RGB, width: int = 1) -> None:
        """Bresenham's line, ``width`` pixels thick."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.rect(x0, y0, x0 + width - 1, y0 + width - 1, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, color: RGB = BLACK) -> None:
        for k, ch in enumerate(s.lower()):
            for row, bits in enumerate(FONT.get(ch, [])):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        px, py = x + k * CHAR_W + col * SCALE, y + row * SCALE
                        self.rect(px, py, px + SCALE - 1, py + SCALE - 1, color)

    def png(self) -> bytes:
        raw = b"".join(
            b"\0" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width])
            for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def axis_range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def tick_label(value: float) -> str:
    return f"{value:.1e}" if value and abs(value) < 0.01 else f"{value:.3g}"


def nice_ticks(lo: float, hi: float, count: int = 5, whole: bool = False) -> list[float]:
    """About ``count`` round values inside [lo, hi], 1, 2 or 5 times a power of ten apart (at least 1
    apart when ``whole``, for steps), so that each can be labelled exactly (``tick_labels``)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    rough = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= rough * 0.999)
    step = max(step, 1.0) if whole else step
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [k * step for k in range(first, last + 1)] or [lo]


def tick_labels(values: Sequence[float]) -> list[str]:
    """One label per tick value, with the fewest digits that write each value to within 1% of the
    gap between ticks: distinct labels that mean their values (never "11.9, 11.9, 11.8", nor 0.0015
    written as "2e-03"). Scientific notation below 0.01 and from 1e6."""
    big = max((abs(v) for v in values), default=0.0)
    scientific = 0 < big < 0.01 or big >= 1e6
    ordered = sorted(values)
    gap = min((b - a for a, b in itertools.pairwise(ordered) if b > a), default=big or 1.0)
    labels: list[str] = []
    for digits in range(12):
        labels = [f"{v:.{digits}e}" if scientific else f"{v:.{digits}f}" for v in values]
        if all(abs(float(label) - v) <= gap * 0.01 for label, v in zip(labels, values)):
            break
    return ["0" if float(label) == 0 else label for label in labels]  # no "-0.00" / "0.0e+00"


def draw_chart(
    canvas: Canvas, x0: int, y0: int, w: int, h: int, title: str, series: Sequence[Series]
) -> None:
    left, right, top, bottom = 62, 12, 40, 34
    px0, py0, px1, py1 = x0 + left, y0 + top, x0 + w - right, y0 + h - bottom
    canvas.text(x0 + left, y0 + 8, title)
    points = [p for _, _, pts in series for p in pts]
    if not points:
        canvas.text(px0 + 10, (py0 + py1) // 2, "no data", GREY)
        return
    (xlo, xhi), (ylo, yhi) = axis_range([p[0] for p in points]), axis_range([p[1] for p in points])

    def to_px(x: float, y: float) -> tuple[int, int]:
        return (
            round(px0 + (x - xlo) / (xhi - xlo) * (px1 - px0)),
            round(py1 - (y - ylo) / (yhi - ylo) * (py1 - py0)),
        )

    ys = nice_ticks(ylo, yhi)
    for fy, label in zip(ys, tick_labels(ys)):  # grid and tick labels
        _, gy = to_px(xlo, fy)
        canvas.line(px0, gy, px1, gy, LIGHT)
        canvas.text(px0 - 6 - len(label) * CHAR_W, gy - CHAR_H // 2, label, GREY)
    xs = nice_ticks(xlo, xhi, whole=True)
    for fx, label in zip(xs, tick_labels(xs)):
        gx, _ = to_px(fx, ylo)
        canvas.line(gx, py0, gx, py1, LIGHT)
        canvas.text(gx - len(label) * CHAR_W // 2, py1 + 8, label, GREY)
    canvas.text(px1 - 4 * CHAR_W, py1 + 8 + CHAR_H + 2, "step", GREY)
    canvas.line(px0, py0, px0, py1, BLACK)
    canvas.line(px0, py1, px1, py1, BLACK)
    legend_x = px1
    for label, color, pts in reversed(series):  # legend, right-aligned above the plot
        legend_x -= len(label) * CHAR_W + 3 * CHAR_W
        canvas.rect(legend_x, y0 + 10, legend_x + CHAR_W, y0 + 10 + CHAR_H - 1, color)
        canvas.text(legend_x + CHAR_W + 4, y0 + 10, label)
        xy = [to_px(x, y) for x, y in sorted(pts)]
        for (ax, ay), (bx, by) in itertools.pairwise(xy):
            canvas.line(ax, ay, bx, by, color, width=2)
        if len(xy) <= 30:
            for x, y in xy:
                canvas.rect(x - 2, y - 2, x + 2, y + 2, color)


def write_charts(
    path: str, charts: Sequence[tuple[str, Sequence[Series]]], size: tuple[int, int] = (480, 320)
) -> None:
    """Charts side by side in one PNG file."""
    w, h = size
    canvas = Canvas(w * max(1, len(charts)), h)
    for i, (title, series) in enumerate(charts):
        draw_chart(canvas, i * w, 0, w, h, title, series)
    with open(path, "wb") as f:
        f.write(canvas.png())


def write_bars(
    path: str,
    title: str,
    bars: Sequence[tuple[str, float]],
    marker: str | None = None,
    marker_at: float | None = None,
    size: tuple[int, int] = (640, 320),
) -> None:
    """A bar chart (one bar per ``(label, value)``, labels under the bars) in one PNG file;
    ``marker_at`` (in bar units from the left edge) draws a labelled vertical line, e.g. a limit."""
    w, h = size
    canvas = Canvas(w, h)
    left, right, top, bottom = 62, 12, 40, 34
    px0, py0, px1, py1 = left, top, w - right, h - bottom
    canvas.text(left, 8, title)
    peak = max((v for _, v in bars), default=0) or 1
    n = max(1, len(bars))
    slot = (px1 - px0) / n
    for i in range(5):  # grid and value ticks
        value = peak * (i + 1) / 5
        gy = round(py1 - value / peak * (py1 - py0))
        canvas.line(px0, gy, px1, gy, LIGHT)
        label = f"{value:.0f}" if 1 <= value < 1e6 else tick_label(value)  # counts: whole numbers fit
        canvas.text(px0 - 6 - len(label) * CHAR_W, gy - CHAR_H // 2, label, GREY)
    every = max(1, math.ceil(n * 4 * CHAR_W / (px1 - px0)))  # skip labels that would overlap
    for k, (label, value) in enumerate(bars):
        x0, x1 = round(px0 + k * slot) + 1, round(px0 + (k + 1) * slot) - 1
        y = round(py1 - value / peak * (py1 - py0))
        if value:
            canvas.rect(x0, min(y, py1 - 1), x1, py1, BAR)
        if k % every == 0:
            canvas.text(x0, py1 + 8, label, GREY)
    canvas.line(px0, py0, px0, py1, BLACK)
    canvas.line(px0, py1, px1, py1, BLACK)
    if marker_at is not None:
        mx = round(px0 + marker_at * slot)
        canvas.line(mx, py0, mx, py1, MARK, width=2)
        if marker:
            canvas.text(max(px0, mx - len(marker) * CHAR_W - 4), py0 + 4, marker, MARK)
    with open(path, "wb") as f:
        f.write(canvas.png())
