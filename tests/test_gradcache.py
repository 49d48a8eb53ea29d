"""GradCache with Matryoshka: loss and every parameter gradient equal the uncached step on the same batch."""

import random
from functools import partial

import pytest
import torch

from mrl import Encoder
from mrl.run.gradcache import cached_backward, chunk_features
from mrl.loss.base import contrastive_loss
from mrl.loss.matryoshka import MatryoshkaLoss
from mrl.loss.nested import contrastive_losses_nested
from mrl.loss.variants import DimSampler

ANCHORS = ["a man plays a guitar on the stage tonight", "a dog", "two women are talking in a busy cafe", "rain",
           "the child kicks a red ball across the park", "an old car", "snow falls on the quiet mountain village",
           "a chef cuts onions"]
POSITIVES = ["someone plays music", "an animal", "people have a conversation", "it is wet outside",
             "a kid plays football", "a vehicle", "it is winter in the mountains", "food is being prepared"]
NEGATIVES = ["the stage is empty", "a cat sleeps", "nobody is talking", "the sun shines", "the child sleeps",
             "a bicycle", "a beach in summer", "the kitchen is closed"]


def encoder(tiny_model_dir, dropout: bool):
    torch.manual_seed(0)
    model = Encoder.from_pretrained(str(tiny_model_dir)).double()
    return model.train(dropout)


def batch(model):
    return dict(model.tokenize(ANCHORS + POSITIVES + NEGATIVES))  # column-major, padded to the longest text


def matryoshka(dims_per_step=None, nested=True):
    """embeddings -> LossParts: the Matryoshka loss at every dim, or at dims_per_step dims drawn per call."""
    loss = MatryoshkaLoss(partial(contrastive_loss, scale=20.0), [32, 16, 8, 4], [1.0, 0.5, 1.0, 2.0],
                          nested_loss=partial(contrastive_losses_nested, scale=20.0) if nested else None)
    sampler = DimSampler(loss.dims, dims_per_step) if dims_per_step else None
    return lambda embeddings: loss(embeddings, None, dims=sampler() if sampler else loss.dims)


def uncached_step(model, features, loss_fn):
    model.zero_grad()
    parts = loss_fn(list(model(features).chunk(3)))
    parts.total.backward()
    return parts.total.detach(), parts.per_dim, {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None}


def cached_step(model, features, loss_fn, chunk_size):
    model.zero_grad()
    parts = cached_backward(model, features, 3, loss_fn, chunk_size, backward=lambda l: l.backward())
    assert not parts.total.requires_grad
    return parts.total, parts.per_dim, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(a, b, tol=1e-10):
    (loss_a, per_dim_a, grads_a), (loss_b, per_dim_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=tol)
    assert per_dim_a.keys() == per_dim_b.keys()
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 5, 24, 100])
def test_cached_step_equals_uncached_step(tiny_model_dir, chunk_size):
    model = encoder(tiny_model_dir, dropout=False)
    features = batch(model)
    assert_same_step(cached_step(model, features, matryoshka(), chunk_size), uncached_step(model, features, matryoshka()))


def test_cached_step_with_dims_per_step(tiny_model_dir):
    """The reference implementation ignores n_dims_per_step with cached losses; here the same dims train."""
    model = encoder(tiny_model_dir, dropout=False)
    features = batch(model)
    random.seed(3)
    cached = cached_step(model, features, matryoshka(dims_per_step=2), 4)
    random.seed(3)
    uncached = uncached_step(model, features, matryoshka(dims_per_step=2))
    assert len(cached[1]) == 2
    assert_same_step(cached, uncached)


def test_dropout_masks_are_replayed(tiny_model_dir):
    """With dropout on, the graph pass must see the masks of the cached pass: the cached step equals an uncached
    step that embeds the same chunks in the same order from the same seed (so draws the same masks)."""
    model = encoder(tiny_model_dir, dropout=True)
    features, loss_fn = batch(model), matryoshka()
    torch.manual_seed(11)
    cached = cached_step(model, features, loss_fn, 6)

    torch.manual_seed(11)
    model.zero_grad()
    chunks = [slice(i, i + 6) for i in range(0, 24, 6)]
    embeddings = torch.cat([model(chunk_features(features, rows)) for rows in chunks])
    parts = loss_fn(list(embeddings.chunk(3)))
    parts.total.backward()
    reference = (parts.total.detach(), parts.per_dim,
                 {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert_same_step(cached, reference)

    torch.manual_seed(12)  # and the masks matter: another seed gives another step
    other = cached_step(model, features, loss_fn, 6)
    assert not torch.allclose(other[0], cached[0])


def test_chunk_features_trims_padding_only(tiny_model_dir):
    model = encoder(tiny_model_dir, dropout=False)
    features = batch(model)
    chunk = chunk_features(features, slice(1, 2))  # "a dog": far shorter than the batch's longest text
    assert chunk["input_ids"].shape[1] == int(features["attention_mask"][1].sum()) < features["input_ids"].shape[1]
    torch.testing.assert_close(model(chunk), model({k: v[1:2] for k, v in features.items()}), rtol=0, atol=1e-12)


@pytest.mark.parametrize("groups", [2, 3, 4, 24])
def test_embedding_in_length_groups_equals_one_forward_in_value_and_gradient(tiny_model_dir, groups):
    """embed_by_length: fewer padded tokens, the same rows in the same order, the same parameter gradients."""
    from mrl.run.speed import embed_by_length

    model = encoder(tiny_model_dir, dropout=False)
    features = batch(model)
    calls = []

    def embed(f):
        calls.append(f["input_ids"].shape)
        return model(f)

    grouped = embed_by_length(embed, features, groups)
    assert len(calls) == min(groups, 24)
    assert sum(rows * length for rows, length in calls) < features["input_ids"].numel()  # less padding
    weights = torch.randn(grouped.shape, generator=torch.Generator().manual_seed(0), dtype=grouped.dtype)
    trained = [p for p in model.parameters() if p.requires_grad]
    grad_grouped = torch.autograd.grad((grouped * weights).sum(), trained, allow_unused=True)
    whole = model(features)
    grad_whole = torch.autograd.grad((whole * weights).sum(), trained, allow_unused=True)
    torch.testing.assert_close(grouped, whole, rtol=0, atol=1e-12)
    for a, b in zip(grad_grouped, grad_whole):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
