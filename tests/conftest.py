"""Session fixtures: real digits data and small models trained with SGD, checkpoints on disk.

Everything is trained once per test session (a few seconds on two cores) and shared read-only.
Code that loads weights into a model itself (Captum) gets a new instance from ``TrainedModel.fresh()``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from trackin_ooc.demo import (
    DigitsSplit,
    digits_cnn,
    digits_mlp,
    load_digits_split,
    train_with_checkpoints,
)

# No progress bars in test output (read by trackin_ooc at call time, also by CLI subprocesses).
os.environ["TRACKIN_OOC_QUIET"] = "1"
# MKL picks its thread count by the machine's load unless told not to: results compared bit for bit across
# processes (a resumed or scaled-out capture against one run) need one summation order.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

# The test models are tiny: one torch thread is as fast, and on a shared two-core machine it avoids
# OpenMP threads spinning against other processes (measured: 3x less CPU for the Captum parity tests).
torch.set_num_threads(int(os.environ.get("TRACKIN_OOC_TEST_TORCH_THREADS", "1")))

# Sizes: small enough that Captum's reference computation and our captures take seconds.
N_TRAIN = 500
N_TEST = 60
MLP_HIDDEN = (64, 64)  # 8,970 parameters; the projection-quality test needs "(64,) or larger"
LEARNING_RATE = 0.1


@dataclass(frozen=True)
class TrainedModel:
    """A model trained by ``train_with_checkpoints`` and what is needed to rebuild it."""

    name: str
    model: nn.Module
    checkpoints: list[Path]
    make: Callable[[], nn.Module]  # a fresh, untrained instance of the same architecture
    last_linear: str  # module name of the final Linear layer (for layer selection)
    learning_rate: float

    def fresh(self) -> nn.Module:
        return self.make()


@pytest.fixture(scope="session")
def digits() -> DigitsSplit:
    """Clean digits: N_TRAIN train examples, the rest test."""
    return load_digits_split(n_train=N_TRAIN, seed=0)


@pytest.fixture(scope="session")
def digits_test(digits) -> TensorDataset:
    """The first N_TEST test examples as a TensorDataset (ids 0..N_TEST-1)."""
    x, y = digits.test.tensors
    return TensorDataset(x[:N_TEST].clone(), y[:N_TEST].clone())


def _train(tmp_path_factory, name, make, dataset, *, epochs, every, last_linear) -> TrainedModel:
    model = make()
    ckpt_dir = tmp_path_factory.mktemp(f"{name}_checkpoints")
    paths = train_with_checkpoints(
        model, dataset, ckpt_dir, epochs=epochs, lr=LEARNING_RATE, checkpoint_every=every, seed=0
    )
    assert len(paths) >= 3, f"fixture {name} needs at least 3 checkpoints, got {len(paths)}"
    assert all(p.is_file() for p in paths)
    return TrainedModel(name, model, paths, make, last_linear, LEARNING_RATE)


@pytest.fixture(scope="session")
def mlp(tmp_path_factory, digits) -> TrainedModel:
    """digits_mlp(hidden=(64, 64)), 12 epochs of SGD, checkpoints at epochs 4, 8, 12."""
    return _train(
        tmp_path_factory,
        "mlp",
        lambda: digits_mlp(MLP_HIDDEN, seed=0),
        digits.train,
        epochs=12,
        every=4,
        last_linear=str(2 * len(MLP_HIDDEN) + 1),
    )


@pytest.fixture(scope="session")
def cnn(tmp_path_factory, digits) -> TrainedModel:
    """digits_cnn (two 3x3 convs + Linear), 9 epochs of SGD, checkpoints at epochs 3, 6, 9."""
    return _train(
        tmp_path_factory,
        "cnn",
        lambda: digits_cnn(seed=0),
        digits.train,
        epochs=9,
        every=3,
        last_linear="fc",
    )


@pytest.fixture(scope="session")
def flipped_digits() -> DigitsSplit:
    """Digits with 10 % of the 1,500 training labels replaced by a wrong class."""
    split = load_digits_split(n_train=1500, flip_fraction=0.1, seed=0)
    assert split.flipped.sum() == 150
    return split


@pytest.fixture(scope="session")
def flipped_mlp(tmp_path_factory, flipped_digits) -> TrainedModel:
    """digits_mlp(hidden=(64,)) trained with SGD on the flipped labels; checkpoints at 10, 20, 30."""
    return _train(
        tmp_path_factory,
        "flipped_mlp",
        lambda: digits_mlp((64,), seed=0),
        flipped_digits.train,
        epochs=30,
        every=10,
        last_linear="3",
    )


# ---- shared captures ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def captured(request, tmp_path_factory, digits, digits_test):
    """``captured(model, split, **capture_kwargs)``: one capture per configuration per session, read-only.

    ``model`` names a session model fixture ("mlp", "cnn", "flipped_mlp"), ``split`` is "train"
    (``digits.train``) or "test" (``digits_test``); keyword arguments go to ``to.capture`` (default
    ``device="cpu"``, ``batch_size=64``, no progress bar). Tests that change a store must capture their own.
    """
    import trackin_ooc as to

    cache: dict = {}
    data = {"train": digits.train, "test": digits_test}

    def get(model: str, split: str, **kw):
        kw = {"device": "cpu", "batch_size": 64, "progress": False, **kw}
        key = (model, split, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            trained = request.getfixturevalue(model)
            path = tmp_path_factory.mktemp(f"captured_{model}_{split}") / "store.zarr"
            cache[key] = to.capture(trained.model, trained.checkpoints, data[split], path, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def exact_pair(captured):
    """``exact_pair(model)``: the (test, train) exact-gradient stores of a session model, captured once."""
    return lambda model: (captured(model, "test"), captured(model, "train"))


@pytest.fixture(scope="session")
def factors_pair(captured):
    """``factors_pair(model)``: the (test, train) per-layer factor stores (``projection="factors"``, layout
    version 2) of a session model, captured once."""
    return lambda model: (captured(model, "test", projection="factors"), captured(model, "train", projection="factors"))


@pytest.fixture(scope="session")
def captum_reference(request, digits, digits_test):
    """``captum_reference(model, layers=None)``: Captum ``TracInCP``'s influence matrix, self-influence and
    top-5 proponents/opponents of ``digits_test`` against ``digits.train`` (tests/test_captum_parity.py),
    computed once per session and configuration."""
    from .test_captum_parity import captum_results

    cache: dict = {}

    def get(model: str, layers=None):
        key = (model, tuple(layers) if layers else None)
        if key not in cache:
            cache[key] = captum_results(request.getfixturevalue(model), digits.train, digits_test, layers)
        return cache[key]

    return get


# ---- a LocalCluster shared by the tests of one module ------------------------------------------------
@pytest.fixture
def local_cluster():
    """The two-worker LocalCluster of tests/__init__.py ``two_worker_client``, its Client active for the
    test (so scoring without ``client=`` runs on it). Started on first use, shared by the module's tests."""
    from . import two_worker_client

    with two_worker_client() as client:
        yield client


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """An idle LocalCluster still costs CPU (~6 s a minute here): stop it when the next test is in
    another module (or none is known yet); the next user starts it again."""
    from . import close_shared_cluster

    if nextitem is None or nextitem.module is not item.module:
        close_shared_cluster()


def pytest_sessionfinish(session, exitstatus):
    from . import close_shared_cluster

    close_shared_cluster()


# ---- order: longest modules first -------------------------------------------------------------------
# make test runs pytest-xdist with --dist loadscope (each module's tests in one process, so module
# fixtures are built once) and --no-loadscope-reorder (modules handed out in this order): the longest
# modules start first, so none starts last and leaves the other process idle. Measured wall seconds,
# serial, 2 cores; a hint only: a module missing here just starts later.
RUN_FIRST = {
    "test_scheduler_file": 85,
    "test_notebooks": 73,
    "test_cli_errors": 56,
    "test_resume_capture": 55,
    "test_output_guard": 44,
    "test_cli": 39,
    "test_index": 31,
    "test_factor_store": 25,
    "test_disk_errors": 20,
    "test_resume_scoring": 19,
    "test_engine_reference": 16,
    "test_distributed": 13,
    "test_demo": 12,
}


def pytest_collection_modifyitems(config, items):
    """Longest modules first, each module's tests in their order (serially too: it changes nothing else)."""
    position = {id(item): i for i, item in enumerate(items)}

    def cost(item) -> float:
        module = getattr(item, "module", None)
        return RUN_FIRST.get(module.__name__.rsplit(".", 1)[-1], 0) if module is not None else 0

    items.sort(key=lambda item: (-cost(item), position[id(item)]))
