"""Arrays to PNG bytes without any imaging library (zlib and struct only).

The views embed example pictures as PNG data URIs; the default install has no Pillow, so this writes
8-bit grayscale, RGB or RGBA PNGs itself. Small pictures (8×8 digits) are enlarged by whole pixels
so they stay sharp in any browser.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array (H, W) (grayscale), (H, W, 3) (RGB) or (H, W, 4) (RGBA)."""
    a = np.ascontiguousarray(pixels, dtype=np.uint8)
    if a.ndim == 2:
        color = 0
        a = a[:, :, None]
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        color = 2 if a.shape[2] == 3 else 6
    else:
        raise ValueError(f"cannot write a PNG of shape {a.shape}; give (H, W), (H, W, 3) or (H, W, 4)")
    h, w, _ = a.shape
    if h == 0 or w == 0:
        raise ValueError("cannot write an empty picture")
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(h))  # filter type 0 on every line
    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")
    )


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Scale an (H, W[, C]) array to 0..255: uint8 is kept; values in [0, 1] are taken as fractions;
    anything else is stretched from its minimum to its maximum (a constant picture is mid-grey)."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    f = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(f.min()), float(f.max())
    if lo >= 0.0 and hi <= 1.0:
        return np.rint(f * 255).astype(np.uint8)
    if 0.0 <= lo and hi <= 255.0 and np.issubdtype(a.dtype, np.integer):
        return f.astype(np.uint8)
    if hi == lo:
        return np.full(f.shape, 128, dtype=np.uint8)
    return np.rint((f - lo) / (hi - lo) * 255).astype(np.uint8)


def enlarge(pixels: np.ndarray, min_side: int = 96) -> np.ndarray:
    """Repeat pixels by a whole factor until the shorter side is at least ``min_side`` (sharp, not blurred)."""
    short = min(pixels.shape[0], pixels.shape[1])
    factor = max(1, -(-min_side // max(1, short)))
    if factor == 1:
        return pixels
    return np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)


def image_png(image: np.ndarray, *, invert: bool = False, min_side: int = 96) -> bytes:
    """PNG bytes of an image array (H, W), (H, W, 1|3|4); ``invert`` draws grayscale ink dark on white."""
    a = to_uint8(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if invert and a.ndim == 2:
        a = 255 - a
    return encode_png(enlarge(a, min_side))
