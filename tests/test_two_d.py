"""2D Matryoshka: per-layer embeddings from one forward, and the loss against an independent float64 formula."""

import random
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from mrl.loss.base import contrastive_loss
from mrl.loss.matryoshka import MatryoshkaLoss
from mrl.loss.two_d import Matryoshka2dLoss

TEXTS = ["a man plays a guitar on the stage", "a dog", "two women talk in a cafe", "it rains"]


def test_all_layers_output(tiny_encoder):
    features = dict(tiny_encoder.tokenize(TEXTS))
    layers = tiny_encoder(features, all_layers=True)
    assert layers.shape == (4, tiny_encoder.num_layers, 32)
    torch.testing.assert_close(layers[:, -1], tiny_encoder(features), rtol=0, atol=1e-6)
    hidden = tiny_encoder.backbone(**features, output_hidden_states=True).hidden_states
    mask = features["attention_mask"].unsqueeze(-1).float()
    for layer in range(1, tiny_encoder.num_layers + 1):  # a loop over layers and a masked mean by hand
        mean = (hidden[layer] * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(layers[:, layer - 1], F.normalize(mean, dim=-1), rtol=0, atol=1e-6)


def test_encode_with_the_first_layers(tiny_encoder):
    full = tiny_encoder.encode(TEXTS)
    torch.testing.assert_close(tiny_encoder.encode(TEXTS, n_layers=tiny_encoder.num_layers), full, rtol=0, atol=1e-6)
    first = tiny_encoder.encode(TEXTS, n_layers=1, truncate_dim=8)
    assert first.shape == (4, 8) and not torch.allclose(first, full[:, :8], atol=1e-3)
    with pytest.raises(ValueError, match="n_layers"):
        tiny_encoder.encode(TEXTS, n_layers=tiny_encoder.num_layers + 1)


def reference_2d_loss(columns, layer, dims, scale, layer_weight, kl_weight, tau):
    """float64, written from the formula with loops: L_M(last) + w·L_M(layer) + w_kl·KL(P_last ‖ P_layer)."""
    def matryoshka(cols):
        total = 0.0
        for d in dims:
            q, candidates = cols[0][:, :d], torch.cat(cols[1:])[:, :d]
            for i in range(len(q)):
                logits = [scale * F.cosine_similarity(q[i], c, dim=0) for c in candidates]
                total = total - (logits[i] - torch.logsumexp(torch.stack(logits), 0)) / len(q)
        return total

    def distribution(cols):
        q, candidates = cols[0], torch.cat(cols[1:])
        return [torch.softmax(torch.stack([F.cosine_similarity(q[i], c, dim=0) / tau for c in candidates]), 0)
                for i in range(len(q))]

    last = [c[:, -1] for c in columns]
    earlier = [c[:, layer - 1] for c in columns]
    kl = sum((p * (p.log() - r.log())).sum() for p, r in zip(distribution(last), distribution(earlier))) / len(last[0])
    return matryoshka(last) + layer_weight * matryoshka(earlier) + kl_weight * kl


def test_2d_loss_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    columns = [torch.randn(5, 4, 16, generator=g, dtype=torch.float64) for _ in range(3)]  # (B, L, D) × 3
    dims = [16, 4]
    loss_fn = Matryoshka2dLoss(MatryoshkaLoss(partial(contrastive_loss, scale=20.0), dims), 1, 0.7, 1.3, 0.3)
    random.seed(5)
    parts = loss_fn(columns, dims=dims)
    layer = int(next(k for k in parts.terms if k.startswith("layer"))[len("layer"):])
    random.seed(5)
    assert sorted(random.sample(range(1, 4), 1)) == [layer]
    expected = reference_2d_loss(columns, layer, dims, 20.0, 0.7, 1.3, 0.3)
    torch.testing.assert_close(parts.total, expected, rtol=1e-10, atol=1e-10)
    assert list(parts.per_dim) == dims and list(parts.terms) == [f"layer{layer}", f"kl_layer{layer}"]


def test_2d_kl_teacher_is_detached():
    """The KL term moves the earlier layer toward the last one, never the last layer toward it."""
    g = torch.Generator().manual_seed(1)
    columns = [torch.randn(4, 3, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    grads = []
    for kl_weight in (0.0, 5.0):
        loss_fn = Matryoshka2dLoss(MatryoshkaLoss(partial(contrastive_loss, scale=20.0), [8]), 1, 1.0, kl_weight)
        random.seed(0)
        grads.append(torch.autograd.grad(loss_fn(columns, dims=[8]).total, columns))
    for without_kl, with_kl in zip(*grads):
        torch.testing.assert_close(with_kl[:, -1], without_kl[:, -1], rtol=0, atol=1e-12)  # last layer: same
        assert not torch.allclose(with_kl[:, :-1], without_kl[:, :-1])  # earlier layers: pulled by the KL


def test_layers_per_step_must_leave_a_last_layer():
    loss_fn = Matryoshka2dLoss(MatryoshkaLoss(partial(contrastive_loss, scale=20.0), [8]), layers_per_step=3)
    with pytest.raises(ValueError, match=r"^layers_per_step: must be in 1\.\.2 for a 3-layer model, got 3$"):
        loss_fn([torch.randn(4, 3, 8), torch.randn(4, 3, 8)], dims=[8])
