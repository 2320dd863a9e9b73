"""Store layout version 1: array names, dimension names, codecs, dtypes, chunk sizes.

Pure data and pure functions; ``gradient_store`` uses them to read and write.
"""

from __future__ import annotations

import numpy as np
from zarr.codecs import Crc32cCodec

FORMAT_VERSION = 1
ATTRS_KEY = "trackin_ooc"

GRADS = "grads"
LEARNING_RATE = "learning_rate"
LOSS = "loss"
EXAMPLE = "example"
LABEL = "label"
BLOCK_COMPLETE = "block_complete"  # one flag per row block: which blocks are fully written
GRAD_SQ_NORM = "grad_sq_norm"  # exact ‖g_c‖² per example before projection (capture only): exact self-influence
NONFINITE = "nonfinite"  # 1 where an example's gradients or loss were NaN/inf (stored as zeros; opt-in)

DIMS = {
    GRADS: ("checkpoint", "example", "feature"),
    LEARNING_RATE: ("checkpoint",),
    LOSS: ("checkpoint", "example"),
    EXAMPLE: ("example",),
    LABEL: ("example",),
    BLOCK_COMPLETE: ("row_block",),
    NONFINITE: ("example",),
    GRAD_SQ_NORM: ("checkpoint", "example"),
}

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
# Target bytes in one grads chunk: big enough for sequential reads, small enough for many per worker.
TARGET_CHUNK_BYTES = 8 * 2**20
MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 1 << 16


def checksum_codecs() -> list:
    """Bytes-to-bytes codecs for every data chunk: a crc32c checksum and no compressor.

    Random projected gradients barely compress (zstd ratio ~0.92) and decompression halves the read
    rate (docs/store-format.md), so the checksum is the only codec.
    """
    return [Crc32cCodec()]


def on_disk_dtype(storage_dtype: str) -> np.dtype:
    """numpy dtype of the zarr array for a storage dtype (bfloat16 is kept as raw uint16 bits)."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"unsupported dtype {storage_dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
    return np.dtype("uint16") if storage_dtype == "bfloat16" else np.dtype(storage_dtype)


def itemsize(storage_dtype: str) -> int:
    return on_disk_dtype(storage_dtype).itemsize


def encode(values: np.ndarray, storage_dtype: str) -> np.ndarray:
    """float32 values -> on-disk representation (round to nearest even for bfloat16)."""
    if storage_dtype == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype(np.uint16)
    return np.asarray(values, dtype=on_disk_dtype(storage_dtype))


def decode(raw: np.ndarray, storage_dtype: str) -> np.ndarray:
    """On-disk representation -> float32 (a view-free copy)."""
    if storage_dtype == "bfloat16":
        return (np.asarray(raw, dtype=np.uint32) << np.uint32(16)).view(np.float32)
    return np.asarray(raw, dtype=np.float32)


def default_chunk_rows(feature_dim: int, n_checkpoints: int, storage_dtype: str, n_examples: int) -> int:
    """Rows per chunk: a power of two near TARGET_CHUNK_BYTES per (checkpoint, rows) chunk."""
    row_bytes = max(1, feature_dim * itemsize(storage_dtype))
    rows = max(1, TARGET_CHUNK_BYTES // row_bytes)
    rows = 1 << (rows.bit_length() - 1)
    rows = min(max(rows, MIN_CHUNK_ROWS), MAX_CHUNK_ROWS)
    return max(1, min(rows, n_examples))


def row_blocks(n_rows: int, block_rows: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of ``block_rows`` covering ``n_rows`` rows."""
    if block_rows <= 0:
        raise ValueError("block_rows must be positive")
    return [(s, min(s + block_rows, n_rows)) for s in range(0, n_rows, block_rows)]
