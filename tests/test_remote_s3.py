"""Remote stores on a real S3-compatible server (moto's server mode) bound to 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest

import trackin_ooc as to


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback, a bucket in it, and the storage options that reach it."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    assert host == "127.0.0.1"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket="trackin-test")
    yield {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    server.stop()


def test_capture_top_k_influence_round_trip_matches_local(s3, mlp, digits, digits_test, tmp_path):
    opts = s3
    kw = dict(projection_dim=256, seed=3, batch_size=128, chunk_rows=128, device="cpu")
    train_url, test_url = "s3://trackin-test/rt/train.zarr", "s3://trackin-test/rt/test.zarr"
    tr = to.capture(mlp.model, mlp.checkpoints, digits.train, train_url, storage_options=opts, **kw)
    te = to.capture(mlp.model, mlp.checkpoints, digits_test, test_url, storage_options=opts, **kw)
    assert tr.complete and tr.path == train_url
    local_tr = to.capture(mlp.model, mlp.checkpoints, digits.train, tmp_path / "train.zarr", **kw)
    local_te = to.capture(mlp.model, mlp.checkpoints, digits_test, tmp_path / "test.zarr", **kw)

    reopened = to.open_store(train_url, storage_options=opts)
    np.testing.assert_array_equal(reopened.read_grads(), local_tr.read_grads())

    remote_top = to.top_k(test_url, train_url, k=5, storage_options=opts)
    local_top = to.top_k(local_te, local_tr, k=5)
    np.testing.assert_array_equal(remote_top.proponent_index.values, local_top.proponent_index.values)
    np.testing.assert_array_equal(remote_top.opponent_index.values, local_top.opponent_index.values)
    np.testing.assert_array_equal(remote_top.proponent_score.values, local_top.proponent_score.values)

    out_url = "s3://trackin-test/rt/influence.zarr"
    remote_inf = to.influence(te, tr, out=out_url, storage_options=opts)
    local_inf = to.influence(local_te, local_tr)
    np.testing.assert_array_equal(remote_inf.values, local_inf.values)
    assert remote_inf.attrs["complete"] is True

    si = to.self_influence(train_url, storage_options=opts)
    np.testing.assert_array_equal(si.values, to.self_influence(local_tr).values)

    with pytest.raises(to.StoreExistsError, match="already exists"):
        to.influence(te, tr, out=out_url, storage_options=opts)


def test_missing_remote_store_is_a_clear_error(s3):
    with pytest.raises(to.StoreError, match="no gradient store"):
        to.open_store("s3://trackin-test/nothing-here.zarr", storage_options=s3)
