"""PNG plots of a training run without a plotting library: line plots (loss curves, several
runs overlaid) and a heatmap (each expert's share of the routed tokens over steps).

The images are drawn into a uint8 tensor and written with zlib (PNG, 8-bit RGB), so the
trainer needs nothing beyond torch. Axis annotations are minimal: the y range and the last
step are written with a 3x5 pixel digit font; the numbers themselves are in metrics.jsonl.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor

from moespec.outputs import write_bytes_atomic

# Distinct line colours (tab10).
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip

# 3x5 glyphs, rows top to bottom, 3 bits each (MSB left).
_FONT = {
    "0": [7, 5, 5, 5, 7], "1": [2, 6, 2, 2, 7], "2": [7, 1, 7, 4, 7], "3": [7, 1, 7, 1, 7],
    "4": [5, 5, 7, 1, 1], "5": [7, 4, 7, 1, 7], "6": [7, 4, 7, 5, 7], "7": [7, 1, 1, 1, 1],
    "8": [7, 5, 7, 5, 7], "9": [7, 5, 7, 1, 7], ".": [0, 0, 0, 0, 2], "-": [0, 0, 7, 0, 0],
    "e": [0, 7, 7, 4, 7], " ": [0, 0, 0, 0, 0],
}  # fmt: skip

W, H, MARGIN = 640, 400, 40


def png_bytes(img_HW3: Tensor) -> bytes:
    """An 8-bit RGB PNG of ``img_HW3`` (uint8 [H, W, 3])."""
    h, w, _ = img_HW3.shape
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), img_HW3.reshape(h, w * 3)], dim=1)
    raw = bytes(rows.flatten().tolist())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def _text(img: Tensor, x: int, y: int, text: str, scale: int = 2) -> None:
    """Draw ``text`` (digits, '.', '-', 'e') with its top-left corner at (x, y)."""
    for ch in text:
        for r, bits in enumerate(_FONT.get(ch, _FONT[" "])):
            for c in range(3):
                if bits >> (2 - c) & 1:
                    y0, x0 = y + r * scale, x + c * scale
                    img[max(y0, 0) : y0 + scale, max(x0, 0) : x0 + scale] = 0
        x += 4 * scale


def _line(img: Tensor, x0: float, y0: float, x1: float, y1: float, colour: tuple[int, int, int]) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = torch.linspace(x0, x1, n).round().long()
    ys = torch.linspace(y0, y1, n).round().long()
    h, w, _ = img.shape
    for dx, dy in ((0, 0), (1, 0), (0, 1)):  # 2 px thick
        xx, yy = (xs + dx).clamp(0, w - 1), (ys + dy).clamp(0, h - 1)
        img[yy, xx] = torch.tensor(colour, dtype=torch.uint8)


def _fmt(v: float) -> str:
    return f"{v:.3g}".replace("e+0", "e").replace("e-0", "e-")


def line_plot(series: list[tuple[list[float], list[float]]]) -> Tensor:
    """Curves (x, y) on shared axes, one colour each (in order of :data:`COLOURS`)."""
    img = torch.full((H, W, 3), 255, dtype=torch.uint8)
    xs = [x for s, _ in series for x in s] or [0.0, 1.0]
    ys = [y for _, s in series for y in s if math.isfinite(y)] or [0.0, 1.0]
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)

    def px(x: float, y: float) -> tuple[float, float]:
        fx = MARGIN + (x - x_lo) / (x_hi - x_lo) * (W - 2 * MARGIN)
        fy = H - MARGIN - (y - y_lo) / (y_hi - y_lo) * (H - 2 * MARGIN)
        return fx, fy

    _line(img, MARGIN, H - MARGIN, W - MARGIN, H - MARGIN, (0, 0, 0))
    _line(img, MARGIN, MARGIN, MARGIN, H - MARGIN, (0, 0, 0))
    _text(img, 2, MARGIN - 12, _fmt(y_hi))
    _text(img, 2, H - MARGIN + 4, _fmt(y_lo))
    _text(img, W - MARGIN - 30, H - MARGIN + 8, _fmt(x_hi))
    for i, (sx, sy) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        pts = [px(x, y) for x, y in zip(sx, sy, strict=True) if math.isfinite(y)]
        for (a, b), (c, d) in itertools.pairwise(pts):
            _line(img, a, b, c, d, colour)
    return img


def heatmap(share_RC: Tensor) -> Tensor:
    """Rows (experts) by columns (logged steps) of values in [0, 1], white (0) to dark blue
    (the largest value), each cell stretched to fill the plot area; negative rows are drawn
    light grey (separators between MoE blocks)."""
    img = torch.full((H, W, 3), 255, dtype=torch.uint8)
    if share_RC.numel() == 0:
        return img
    r, c = share_RC.shape
    top = float(share_RC.max()) or 1.0
    v = share_RC / top
    rows = (torch.arange(H - 2 * MARGIN) * r // (H - 2 * MARGIN)).clamp(max=r - 1)
    cols = (torch.arange(W - 2 * MARGIN) * c // (W - 2 * MARGIN)).clamp(max=c - 1)
    cell = v[rows][:, cols]
    blue = torch.tensor([8.0, 48.0, 107.0])
    white = torch.tensor([255.0, 255.0, 255.0])
    rgb = white + cell.clamp(0, 1)[..., None] * (blue - white)
    rgb[cell < 0] = torch.tensor([200.0, 200.0, 200.0])
    img[MARGIN : H - MARGIN, MARGIN : W - MARGIN] = rgb.round().byte()
    _text(img, 2, MARGIN - 12, _fmt(top))
    return img


def save_png(path: str | Path, img_HW3: Tensor) -> None:
    """Write ``img_HW3`` as a PNG (atomically, parents made)."""
    write_bytes_atomic(Path(path), png_bytes(img_HW3))
