"""The factored projection on transformers nobody tuned it on: a few configs of the seeded sweep
(trackin_ooc.demo.transformer_family; the full sweep is benchmarks/sweep_projection.py).

On each config: train and test stores captured separately are the factored map of per-example autograd
gradients and share one plan; their scores rank against exact influence within 0.02 of a dense Gaussian
projection at the same dims (both as means over seeds: single draws vary by a few hundredths).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trackin_ooc as to
from trackin_ooc.capturing.projection.factored import plan_from_spec
from trackin_ooc.demo import transformer_family as family

TOLERANCE = 0.02
SWEEP = family.sample_configs(20, seed=0)  # the sweep's configs, in its order
# (config index, dims): GPT-2 with a tied head, a small RoBERTa classifier, a 3-layer BERT classifier, a ViT.
CASES = [(1, (1024, 2048)), (6, (1024, 8192)), (4, (2048,)), (7, (1024,))]
FACTORED_SEEDS, GAUSSIAN_SEEDS = 3, 16


@pytest.fixture(scope="module", params=CASES, ids=lambda c: SWEEP[c[0]].describe().replace(" ", "-"))
def trained(request):
    index, dims = request.param
    torch.manual_seed(0)
    case = family.build_case(SWEEP[index])
    exact, gram, grads = family.exact_influence(case)
    return case, dims, exact, gram, grads


def test_separate_train_and_test_stores_are_the_factored_map_and_agree(trained):
    case, dims, exact, _, grads = trained
    k = dims[0]
    scores, train_feats, train = family.factored_scores(case, k, seed=0)
    assert train.feature_dim == k
    plan = plan_from_spec(train.spec)
    assert all(x.mix == k for x in plan)  # every layer maps into the k shared dims
    # The hooks compute the same linear map as project_gradients of the autograd gradients.
    want = family.factored_map_scores(case, grads, k, seed=0)
    assert np.abs(scores - want).max() <= 1e-4 * np.abs(want).max()
    # A test store made with capture_like reuses the plan: same fingerprint, same scores.
    test = to.capture_like(
        train,
        case.make(),
        torch.utils.data.DataLoader(case.test, batch_size=16, collate_fn=family.collate),
        None,
        checkpoints=case.checkpoints,
        loss_fn=case.loss_fn,
        device="cpu",
        progress=False,
    )
    assert test.fingerprint == train.fingerprint
    np.testing.assert_allclose(to.influence(test, train).values, scores, rtol=1e-4, atol=1e-6 * np.abs(scores).max())


def test_factored_ranks_like_a_dense_gaussian_projection(trained):
    case, dims, exact, gram, grads = trained
    for k in dims:
        gaussian = np.mean(
            [
                family.mean_row_spearman(
                    family.gaussian_scores(gram, case.learning_rates, len(case.test), k, 100 + s), exact
                )
                for s in range(GAUSSIAN_SEEDS)
            ]
        )
        factored = np.mean(
            [
                family.mean_row_spearman(family.factored_map_scores(case, grads, k, s), exact)
                for s in range(FACTORED_SEEDS)
            ]
        )
        assert factored >= gaussian - TOLERANCE, (
            f"{case.cfg.describe()} at {k}: factored {factored:.3f}, gaussian {gaussian:.3f}"
        )
