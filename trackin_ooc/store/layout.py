"""Store layout: array names, dimension names, codecs, dtypes, chunk sizes.

Version 1: the arrays below. Version 2 (written only by ``capture(..., projection="factors")``) adds
per-layer factor arrays beside ``grads`` (which then holds the flat part, possibly 0 wide); see
:class:`FactorArray` and docs/store-format.md. Pure data and pure functions; ``gradient_store`` uses them
to read and write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import Crc32cCodec

FORMAT_VERSION = 1
FACTORS_FORMAT_VERSION = 2  # a store with per-layer factor arrays
READABLE_VERSIONS = (FORMAT_VERSION, FACTORS_FORMAT_VERSION)
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

FACTORS_ATTR = "factors"  # group attribute (under ATTRS_KEY): the per-layer factor layout, version 2
FACTOR_POSITIONS_ATTR = "factor_positions"  # {module: positions} of every layer the choice was made for
FACTORS_PREFIX = "factors_"  # factors_<i>: (checkpoint, example, position_<i>, width_<i>)
TOKENS_PREFIX = "tokens_"  # tokens_<i>: (example, position_<i>) int64 token ids of an Embedding layer
NO_TOKEN = -1  # token id of a padded position


@dataclass(frozen=True)
class FactorArray:
    """One layer stored as factors (layout version 2): per example and checkpoint, ``positions`` rows of
    ``width`` values.

    Linear/Conv layers (``tokens`` False): each row is [a | δ], the layer input at that position with a 1
    appended when the layer has a bias (``d_in`` values) and the output gradient (``d_out`` values).
    Embedding layers (``tokens`` True): each row is δ (``d_out`` values) and the token ids sit in the
    checkpoint-independent ``tokens_<i>`` array. Positions beyond an example's own are zero (and token
    ``NO_TOKEN``): they add nothing to any inner product.
    """

    index: int
    module: str
    kind: str  # "linear", "conv2d" or "embedding"
    positions: int
    d_in: int  # input side as the gradient sees it (incl. the bias row; the vocabulary for an Embedding)
    d_out: int
    tokens: bool = False

    @property
    def name(self) -> str:
        return f"{FACTORS_PREFIX}{self.index}"

    @property
    def tokens_name(self) -> str | None:
        return f"{TOKENS_PREFIX}{self.index}" if self.tokens else None

    @property
    def width(self) -> int:
        return self.d_out if self.tokens else self.d_in + self.d_out

    @property
    def a_width(self) -> int:
        """Columns of a in each stored row (0 for an Embedding: its a is a token id)."""
        return 0 if self.tokens else self.d_in

    @property
    def dims(self) -> tuple[str, ...]:
        return ("checkpoint", "example", f"position_{self.index}", f"width_{self.index}")

    @property
    def token_dims(self) -> tuple[str, ...]:
        return ("example", f"position_{self.index}")

    @property
    def row_values(self) -> int:
        """Stored values per example and checkpoint (token ids counted once per position)."""
        return self.positions * self.width + (self.positions if self.tokens else 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "module": self.module,
            "kind": self.kind,
            "positions": self.positions,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "tokens": self.tokens,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FactorArray:
        return cls(
            index=int(d["index"]),
            module=str(d["module"]),
            kind=str(d["kind"]),
            positions=int(d["positions"]),
            d_in=int(d["d_in"]),
            d_out=int(d["d_out"]),
            tokens=bool(d.get("tokens", False)),
        )


STORAGE_DTYPES = ("float32", "float16", "bfloat16")
# Target bytes in one grads chunk: big enough for sequential reads, small enough for many per worker.
TARGET_CHUNK_BYTES = 8 * 2**20
MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 1 << 16


def checksum_codecs() -> list[Any]:
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


def gradient_bytes(
    n_checkpoints: int, n_examples: int, feature_dim: int, factors: Sequence[FactorArray], storage_dtype: str
) -> int:
    """Bytes of a store's gradients as laid out (uncompressed): ``grads`` plus every factor array and its
    token ids. What a capture announces before it starts and ``GradientStore.nbytes`` reports after."""
    size = itemsize(storage_dtype)
    total = n_checkpoints * n_examples * feature_dim * size
    for f in factors:
        total += n_checkpoints * n_examples * f.positions * f.width * size
        total += n_examples * f.positions * 8 if f.tokens else 0
    return int(total)


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
