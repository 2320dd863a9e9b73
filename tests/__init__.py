"""Shared test markers, made once (xarray-style)."""

import pytest

from trackin_ooc.engine.backend import cupy_usable

has_cupy = cupy_usable()
requires_cupy = pytest.mark.skipif(not has_cupy, reason="needs cupy and a CUDA device")
