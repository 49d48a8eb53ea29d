"""False-negative masking in the contrastive loss: candidates an anchor scores above its own positive plus a
margin, at full width, leave its denominator at every prefix. Against a float64 loop formula; the nested
(prefix-sum) path equal to the per-dim loop, in value and gradient."""

import math
from functools import partial

import pytest
import torch

from mrl.run.config import load_config
from mrl.loss.base import contrastive_loss, false_negatives
from mrl.loss.matryoshka import MatryoshkaLoss
from mrl.loss.nested import contrastive_losses_nested
from mrl.loss.objective import Objective


def columns(seed, n=3, batch=6, width=16):
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randn(batch, width, generator=g, dtype=torch.float64) for _ in range(n)]
    cols[1][2] = cols[0][4] + 0.01 * cols[1][2]  # anchor 4 finds a near-copy of itself among the positives
    return [c.requires_grad_() for c in cols]


def loop_cos(u, v):
    return float(u @ v) / math.sqrt(float(u @ u) * float(v @ v))


def loop_masked_loss(embeddings, d, margin, scale=20.0):
    """-1/B Σ_i log(exp(s·cos(q_i, p_i)) / Σ_{j kept} exp(s·cos(q_i, C_j))); kept: j = i, or cos at FULL width
    ≤ cos(q_i, p_i) + margin. Written with loops over rows."""
    q, candidates = embeddings[0].detach(), torch.cat(embeddings[1:]).detach()
    total = 0.0
    for i in range(len(q)):
        positive_full = loop_cos(q[i], candidates[i])
        kept = [j for j in range(len(candidates)) if j == i or loop_cos(q[i], candidates[j]) <= positive_full + margin]
        logits = [scale * loop_cos(q[i, :d], candidates[j, :d]) for j in kept]
        top = max(logits)
        total -= scale * loop_cos(q[i, :d], candidates[i, :d]) - top - math.log(sum(math.exp(x - top) for x in logits))
    return total / len(q)


@pytest.mark.parametrize("margin", [0.0, 0.1, -0.05])
def test_the_mask_is_decided_at_full_width_and_used_at_every_prefix(margin):
    embeddings = columns(0)
    exclude = false_negatives(embeddings, margin)
    assert exclude.shape == (6, 12) and not exclude[torch.arange(6), torch.arange(6)].any()
    assert exclude[4, 2]  # the near-copy of anchor 4 is left out of its denominator
    for d in (16, 8, 4):
        got = contrastive_loss([e[:, :d] for e in embeddings], exclude=exclude)
        assert float(got) == pytest.approx(loop_masked_loss(embeddings, d, margin), rel=1e-10)


def test_masking_lowers_the_loss_of_the_anchor_that_had_a_false_negative():
    embeddings = columns(1)
    exclude = false_negatives(embeddings, 0.0)
    assert exclude.any()
    assert contrastive_loss(embeddings, exclude=exclude) < contrastive_loss(embeddings)


@pytest.mark.parametrize("rows", [None, [1, 4]])
def test_nested_masked_losses_equal_the_per_dim_loop_in_value_and_gradient(rows):
    embeddings = columns(2)
    rows = None if rows is None else torch.tensor(rows)
    exclude = false_negatives(embeddings, 0.05, rows)
    results = []
    for nested in (None, partial(contrastive_losses_nested, scale=20.0)):
        loss = MatryoshkaLoss(partial(contrastive_loss, scale=20.0), [16, 8, 4], [1.0, 0.5, 2.0], nested)
        parts = loss(embeddings, dims=loss.dims, rows=rows, exclude=exclude)
        results.append((parts.total, parts.per_dim, torch.autograd.grad(parts.total, embeddings)))
    (total_loop, per_dim_loop, grads_loop), (total_nested, per_dim_nested, grads_nested) = results
    torch.testing.assert_close(total_nested, total_loop, rtol=1e-12, atol=1e-12)
    for d in per_dim_loop:
        torch.testing.assert_close(per_dim_nested[d], per_dim_loop[d], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_nested, grads_loop):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_objective_masks_when_asked_and_only_then():
    embeddings = columns(3)
    plain = load_config(None, ["loss.name=contrastive", "loss.dims=[16,8]"]).loss
    masked = load_config(None, ["loss.name=contrastive", "loss.dims=[16,8]", "loss.false_negative_margin=0.0"]).loss
    total_plain = Objective(plain, 16)(embeddings).total
    total_masked = Objective(masked, 16)(embeddings).total
    exclude = false_negatives(embeddings, 0.0)
    expected = sum(float(contrastive_loss([e[:, :d] for e in embeddings], exclude=exclude)) for d in (16, 8))
    assert float(total_masked) == pytest.approx(expected, rel=1e-10) and total_masked < total_plain
    with pytest.raises(ValueError, match="loss.false_negative_margin: acts on the contrastive loss, and no training"):
        load_config(None, ["loss.false_negative_margin=0.1"])  # the default loss is CoSENT
