"""samples.png without a plotting library: panels rasterised with torch and written as a PNG."""
from __future__ import annotations

import struct
import zlib

import torch

PANEL = 160      # pixels per panel side
LABEL_ROWS = 12  # rows above each panel for its caption

# 3×5 bitmap font for captions: digits, lowercase letters and a few symbols.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", "a": "010101111101101", "b": "110101110101110",
    "c": "011100100100011", "d": "110101101101110", "e": "111100110100111", "f": "111100110100100",
    "g": "011100101101011", "h": "101101111101101", "i": "111010010010111", "j": "001001001101010",
    "k": "101101110101101", "l": "100100100100111", "m": "101111111101101", "n": "110101101101101",
    "o": "010101101101010", "p": "110101110100100", "q": "010101101011001", "r": "110101110101101",
    "s": "011100010001110", "t": "111010010010010", "u": "101101101101111", "v": "101101101101010",
    "w": "101101111111101", "x": "101101010101101", "y": "101101010010010", "z": "111001010100111",
    " ": "000000000000000", "-": "000000111000000", ".": "000000000000010", ",": "000000000010100",
    "(": "010100100100010", ")": "010001001001010", "/": "001001010100100", "=": "000111000111000",
}


def _caption(text: str, width: int) -> torch.Tensor:
    img = torch.ones(LABEL_ROWS, width)
    x = 2
    for ch in text.lower():
        bits = _GLYPHS.get(ch, _GLYPHS[" "])
        glyph = torch.tensor([float(b) for b in bits]).view(5, 3)
        if x + 3 > width:
            break
        img[3:8, x:x + 3] = 1 - glyph
        x += 4
    return img


def scatter_panel(points: torch.Tensor, extent: float = 2.4) -> torch.Tensor:
    """[n, 2] points -> [PANEL, PANEL] grey image (white background, dark where points fall)."""
    pts = points.detach().double().cpu()
    ij = ((pts + extent) / (2 * extent) * (PANEL - 1)).round().long()
    keep = ((ij >= 0) & (ij < PANEL)).all(dim=1)
    ij = ij[keep]
    counts = torch.zeros(PANEL * PANEL, dtype=torch.float64)
    counts.index_add_(0, (PANEL - 1 - ij[:, 1]) * PANEL + ij[:, 0], torch.ones(ij.shape[0], dtype=torch.float64))
    density = (counts / 3.0).clamp(max=1.0).view(PANEL, PANEL)
    return (1.0 - 0.9 * density).float()


def image_grid_panel(images: torch.Tensor, shape: tuple[int, int], cols: int = 8) -> torch.Tensor:
    """[n, h*w] images in [-1, 1] -> a [PANEL, PANEL] grid of cols×cols of them, evenly spaced over
    the n (the evaluation sets are ordered by class: every class shows), nearest upscaled."""
    h, w = shape
    n = min(images.shape[0], cols * cols)
    picks = torch.linspace(0, images.shape[0] - 1, n).round().long()
    imgs = ((images.detach().float().cpu()[picks].view(n, h, w) + 1) / 2).clamp(0, 1)
    cell = PANEL // cols
    scale = max(1, (cell - 1) // max(h, w))
    panel = torch.ones(PANEL, PANEL)
    for k in range(n):
        r, c = divmod(k, cols)
        tile = 1 - imgs[k].repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # dark strokes on white
        panel[r * cell:r * cell + tile.shape[0], c * cell:c * cell + tile.shape[1]] = tile
    return panel


def compose(rows: list[list[tuple[str, torch.Tensor]]]) -> torch.Tensor:
    """Rows of (caption, panel) -> one [H, W] image with 4-pixel gutters."""
    gutter = 4
    cols = max(len(r) for r in rows)
    height = len(rows) * (PANEL + LABEL_ROWS + gutter) + gutter
    width = cols * (PANEL + gutter) + gutter
    canvas = torch.ones(height, width)
    for i, row in enumerate(rows):
        top = gutter + i * (PANEL + LABEL_ROWS + gutter)
        for j, (caption, panel) in enumerate(row):
            left = gutter + j * (PANEL + gutter)
            canvas[top:top + LABEL_ROWS, left:left + PANEL] = _caption(caption, PANEL)
            canvas[top + LABEL_ROWS:top + LABEL_ROWS + PANEL, left:left + PANEL] = panel
    return canvas


def write_png(path, image: torch.Tensor) -> None:
    """Writes a [H, W] grey image with values in [0, 1] as an 8-bit PNG."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    height, width = pixels.shape
    raw = b"".join(b"\x00" + bytes(pixels[r].tolist()) for r in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))
