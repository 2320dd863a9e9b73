"""The factored plan (projection/factored_plan.py): pure functions of the layers' kinds and shapes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trackin_ooc as to
from trackin_ooc.capturing.projection import factored_plan as fp
from trackin_ooc.capturing.projection.factored_plan import FactorLayer, LayerGroup, plan_groups, stored_dim
from trackin_ooc.spec import ProjectionSpec

KINDS = ["linear", "conv2d", "hf_conv1d", "embedding", "dense"]


@st.composite
def layer_groups(draw):
    n = draw(st.integers(1, 7))
    out = []
    for i in range(n):
        kind = draw(st.sampled_from(KINDS))
        d_in = 1 if kind == "dense" else draw(st.integers(1, 5000))
        d_out = draw(st.integers(1, 5000))
        out.append(LayerGroup(kind, f"m{i}", (f"m{i}.weight",), d_in, d_out, draw(st.integers(1, 1024))))
    return out


@settings(max_examples=150, deadline=None)
@given(groups=layer_groups(), dim=st.integers(1, 20000))
def test_plan_properties(groups, dim):
    plan = plan_groups(groups, dim)
    assert plan == plan_groups(groups, dim)  # a pure function: train and test stores get the same plan
    assert [(x.kind, x.module, x.d_in, x.d_out) for x in plan] == [(g.kind, g.module, g.d_in, g.d_out) for g in groups]
    total = sum(g.d_in * g.d_out for g in groups)
    if total <= dim:  # everything fits: exact and narrower
        assert all(x.in_identity and x.out_identity and not x.mix for x in plan)
        assert stored_dim(plan) == total
        return
    assert stored_dim(plan) == dim and all(x.mix == dim for x in plan)
    direct = [x for x in plan if x.direct]
    assert sum(x.exact_width for x in direct) * dim <= fp.DENSE_ELEMENTS
    if direct:  # the smallest layers take the dense maps
        assert (
            max(x.exact_width for x in direct) <= min(x.exact_width for x in plan if not x.direct)
            if len(direct) < len(plan)
            else True
        )
    for x in plan:
        if x.direct:
            assert x.width == dim
        elif x.exact_width <= fp.HASH_ELEMENTS or x.kind == "dense":
            assert x.hashed_whole and x.width == x.exact_width
        else:  # a wide layer: its own projection, below its exact width, then hashed
            assert not x.hashed_whole and x.width < x.exact_width and x.width <= fp.WIDE * dim
            assert x.width <= x.k_in * x.k_out * x.blocks
    # The spec round trip keeps the plan.
    assert fp.plan_from_extra(fp.plan_extra(plan, dim)) == plan
    assert [FactorLayer.from_dict(x.to_dict()) for x in plan] == plan


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(["linear", "conv2d", "embedding"]),
    d_in=st.integers(2, 20000),
    d_out=st.integers(2, 20000),
    share=st.integers(1, 200000),
    positions=st.integers(1, 2048),
)
def test_factor_widths_of_a_wide_layer(kind, d_in, d_out, share, positions):
    share = min(share, d_in * d_out - 1)
    k_in, k_out, blocks, width = fp.factor_widths(kind, d_in, d_out, share, positions)
    assert 1 <= k_in <= d_in and 1 <= k_out <= d_out and blocks >= 1
    assert 1 <= width <= share and width <= k_in * k_out * blocks
    if blocks > 1:  # blocks only with both factors random
        assert k_in < d_in and k_out < d_out


def test_wide_layers_only_above_the_hash_limit():
    big = LayerGroup("linear", "big", ("big.weight",), 4097, 4096)
    small = LayerGroup("linear", "small", ("small.weight",), 1025, 1024)
    plan = plan_groups([big, small], 2048)
    assert not plan[0].hashed_whole and plan[0].width == fp.WIDE * 2048
    assert plan[1].hashed_whole


def test_bad_dims_are_refused():
    with pytest.raises(to.CaptureError, match="projection_dim"):
        plan_groups([LayerGroup("linear", "a", ("a.weight",), 3, 3)], 0)


# ---- plan versions ----------------------------------------------------------------------------------------
V1_EXTRA = {  # what trackin-ooc wrote before plan version 2 (a digits MLP layer and the dense rest)
    "version": 1,
    "factor": "gaussian",
    "requested_dim": 300,
    "layers": [
        {
            "kind": "linear",
            "module": "fc",
            "params": ["fc.weight", "fc.bias"],
            "d_in": 65,
            "d_out": 32,
            "k_in": 5,
            "k_out": 5,
            "width": 200,
            "blocks": 8,
        },
        {
            "kind": "dense",
            "module": "",
            "params": ["norm.weight"],
            "d_in": 1,
            "d_out": 32,
            "k_in": 1,
            "k_out": 32,
            "width": 32,
            "blocks": 1,
        },
        {
            "kind": "pad",
            "module": "",
            "params": [],
            "d_in": 0,
            "d_out": 0,
            "k_in": 0,
            "k_out": 0,
            "width": 68,
            "blocks": 1,
        },
    ],
}


def test_version_1_plans_are_read_as_before():
    plan = fp.plan_from_extra(V1_EXTRA)
    assert [x.mix for x in plan] == [0, 0, 0]  # each layer a slice of its own, as version 1 stored it
    assert stored_dim(plan) == 300
    assert plan[0].blocks == 8 and plan[0].scale == pytest.approx((40 * 40 / 200) ** 0.5)


def test_version_1_and_2_stores_never_combine():
    layers = (("fc.weight", (32, 64)), ("fc.bias", (32,)), ("norm.weight", (32,)))
    old = ProjectionSpec(kind="factored", dim=300, seed=0, layers=layers, extra=(("factored", V1_EXTRA),))
    groups = [
        LayerGroup("linear", "fc", ("fc.weight", "fc.bias"), 65, 32),
        LayerGroup("dense", "", ("norm.weight",), 1, 32),
    ]
    new_plan = plan_groups(groups, 300)
    new = ProjectionSpec(
        kind="factored", dim=300, seed=0, layers=layers, extra=(("factored", fp.plan_extra(new_plan, 300)),)
    )
    assert old.fingerprint != new.fingerprint and "factored differ" in old.difference(new)


@pytest.mark.parametrize("change", [{"version": 3}, {"mix": "srht"}, {"factor": "rademacher"}])
def test_unknown_plans_are_refused(change):
    extra = dict(fp.plan_extra(plan_groups([LayerGroup("linear", "a", ("a.weight",), 300, 300)], 64), 64), **change)
    with pytest.raises(to.CaptureError, match="re-capture"):
        fp.plan_from_extra(extra)
