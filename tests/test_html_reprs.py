"""HTML reprs for Jupyter: GradientStore, TopKIndex and the projection plan render as escaped tables."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import trackin_ooc as to
from trackin_ooc.demo import digits_cnn, load_digits_split, train_with_checkpoints
from trackin_ooc.views.reprs import plan_body


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reprs")
    torch.manual_seed(0)
    split = load_digits_split(n_train=200, seed=0)
    model = digits_cnn(seed=0)
    ckpts = train_with_checkpoints(model, split.train, folder / "ckpt", epochs=2, checkpoint_every=1)
    data = Subset(split.train, range(120))
    stores = {
        kind: to.capture(
            model,
            ckpts,
            data,
            folder / f"{kind}.zarr",
            projection=kind,
            progress=False,
            projection_dim=None if kind == "factors" else 48,
        )
        for kind in ("gaussian", "factored", "factors")
    }
    return stores, ckpts


def _cells(html: str) -> dict[str, str]:
    """The key-value rows of the first table: {name: value}."""
    return dict(re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", html))


def test_gradient_store_repr_is_a_table_of_what_it_holds(run):
    stores, ckpts = run
    st = stores["gaussian"]
    html = st._repr_html_()
    cells = _cells(html)
    assert cells["path"] == st.path and cells["examples"] == "120" and cells["checkpoints"] == "2"
    assert cells["features"] == "48 features" and cells["state"] == "complete"
    assert cells["projection"] == st.spec.describe() and st.fingerprint[:16] in cells["fingerprint"]
    for name, lr in zip(st.checkpoint_names, st.learning_rates):
        assert f"<td>{name}</td>" in html and f"{lr:g}" in html
    for name, shape in st.spec.layers:  # a dense projection lists its parameters
        assert f"<td>{name}</td>" in html and " × ".join(map(str, shape)) in html
    assert "<script" not in html


def test_factored_and_factors_plans_render_per_layer(run):
    stores, _ = run
    factored = stores["factored"]
    plan = dict(factored.spec.extra)["factored"]["layers"]
    html = factored._repr_html_()
    for layer in plan:
        if layer["kind"] not in ("dense", "pad"):
            assert f"<td>{layer['module']}</td><td>{layer['kind']}</td>" in html
            assert f"{layer['d_in']:,} → {layer['k_in']:,}" in html
            assert f'<td class="num">{layer["width"]:,}</td>' in html
    # Every layer maps into the shared dims (plan version 2): the store's width is theirs.
    assert all(x["mix"] == factored.feature_dim for x in plan)
    factors = stores["factors"]
    html = factors._repr_html_()
    for layer in dict(factors.spec.extra)["factors"]["layers"]:
        assert f"<td>{layer['module']}</td>" in html and f"<td>{layer['store']}</td>" in html
    assert "flat feature" in html and "factor layers" in html


def test_plan_table_html_takes_a_spec_its_dict_its_plan_or_a_plan_object(run):
    stores, _ = run
    spec = stores["factored"].spec
    from_spec = to.plan_table_html(spec)
    assert from_spec == to.plan_table_html(spec.to_dict())
    layers = dict(spec.extra)["factored"]["layers"]

    def layer_table(html: str) -> str:
        return html[html.rindex('<table class="tko-t"><tr><th>layer</th>') :]

    # The same per-layer table from the spec, its plan entry and the bare list of layers.
    assert layer_table(plan_body(spec)) == layer_table(plan_body(dict(spec.extra)["factored"])) == plan_body(layers)
    assert plan_body(layers).count("<tr>") == len(layers) + 1
    assert "<th>requested_dim</th><td>48</td>" in plan_body(dict(spec.extra)["factored"])

    class Estimate:  # a pre-capture plan of another shape: its keys become the columns
        def to_dict(self):
            return {
                "projection": "factored",
                "bytes": 123456,
                "layers": [
                    {"name": "conv<1>", "kind": "conv2d", "values": 10},
                    {"name": "fc", "kind": "linear", "values": 20},
                ],
            }

    html = to.plan_table_html(Estimate())
    assert "<th>name</th><th>kind</th><th>values</th>" in html
    assert "<td>conv&lt;1&gt;</td>" in html and "conv<1>" not in html
    assert "<th>bytes</th><td>123,456</td>" in html
    with pytest.raises(TypeError, match="plan_table_html takes"):
        to.plan_table_html(42)


def test_top_k_index_repr_shows_the_calibration(run):
    stores, _ = run
    idx = to.build_index(stores["gaussian"], n_lists=6, progress=False)
    html = idx._repr_html_()
    cells = _cells(html)
    assert cells["lists"] == "6 over 120 rows" and cells["state"] == "complete"
    assert cells["n_probe"].startswith(f"{idx.n_probe} by default")
    table = idx.calibration["by_n_probe"]
    rows = re.findall(r"<tr><td class=\"num\">(\d+)</td>((?:<td class=\"num\">[^<]*</td>)+)</tr>", html)
    assert [int(r[0]) for r in rows] == sorted(int(p) for p in table)
    first = str(rows[0][0])
    assert f">{table[first]['proponent_recall']:.4g}<" in rows[0][1]


def test_names_from_disk_are_escaped(tmp_path):
    folder = tmp_path / "<img src=x onerror=alert(1)>"
    folder.mkdir()
    st = to.from_arrays(folder / "s.zarr", np.ones((1, 4, 3), np.float32), [0.1])
    html = st._repr_html_()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
