"""Checksums at work: find which chunks of which arrays fail their crc32c, and say so by name."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import zarr

from ..errors import CorruptChunkError


@dataclass(frozen=True)
class BadChunk:
    array: str
    chunk: tuple[int, ...]
    error: str

    def __str__(self) -> str:
        return f"array {self.array!r} chunk {'/'.join(map(str, self.chunk))}"


def is_checksum_error(e: BaseException) -> bool:
    return "checksum" in str(e).lower()


def _chunk_ranges(arr: zarr.Array[Any], region: tuple[slice, ...] | None) -> Iterator[tuple[int, ...]]:
    grid = [range((n + c - 1) // c) for n, c in zip(arr.shape, arr.chunks)]
    if region is not None:
        grid = [
            range(s.start // c if s.start else 0, ((s.stop if s.stop is not None else n) + c - 1) // c)
            if isinstance(s, slice)
            else range(s // c, s // c + 1)
            for s, n, c in zip(region, arr.shape, arr.chunks)
        ] + grid[len(region) :]
    return itertools.product(*grid)


def bad_chunks(arr: zarr.Array[Any], name: str, region: tuple[Any, ...] | None = None) -> list[BadChunk]:
    """Read chunk by chunk (within ``region``) and list the ones that fail to decode."""
    found = []
    for idx in _chunk_ranges(arr, region):
        sel = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, arr.chunks, arr.shape))
        try:
            arr[sel]
        except Exception as e:  # a checksum or decode failure of this chunk
            found.append(BadChunk(name, tuple(idx), str(e).splitlines()[0][:120]))
    return found


def checked_read(arr: zarr.Array[Any], name: str, sel: Any, where: str) -> Any:
    """``arr[sel]``, but a checksum failure raises CorruptChunkError naming the array and chunk."""
    try:
        return arr[sel]
    except ValueError as e:
        if not is_checksum_error(e):
            raise
        bad = bad_chunks(arr, name, sel) or [BadChunk(name, (), str(e))]
        raise CorruptChunkError(
            f"store {where}: {bad[0]} failed its crc32c checksum ({len(bad)} bad chunk(s) in this read): the "
            "data on disk is damaged; re-capture or restore the store (`trackin-ooc info --verify` lists all)"
        ) from None


def verify_group(group: zarr.Group) -> list[BadChunk]:
    """Every chunk of every array in the group, read and checked."""
    out: list[BadChunk] = []
    for name, arr in sorted(group.arrays(), key=lambda x: x[0]):
        out.extend(bad_chunks(arr, name))
    return out
