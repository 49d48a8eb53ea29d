"""All dims at once (prefix sums of block products) equals the direct per-dim computation, in float64."""

import random
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mrl.loss.device import device_constant
from mrl.loss.base import contrastive_loss, cosent_loss
from mrl.loss.matryoshka import MatryoshkaLoss
from mrl.loss.nested import contrastive_losses_nested, cosent_losses_nested, nested_cosine_matrices, nested_pair_cosines
from mrl.loss.variants import DimSampler, LearnedWeightsMatryoshkaLoss

DIMS = [48, 8, 64, 16, 3]  # any order, a dim that is not a power of two, the full width


def direct_cosines(a, b, d):
    return F.normalize(a[:, :d], dim=-1) @ F.normalize(b[:, :d], dim=-1).T


@pytest.mark.parametrize("seed", range(3))
def test_nested_cosine_matrices_equal_per_dim_matmuls(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(7, 64, generator=g, dtype=torch.float64), torch.randn(11, 64, generator=g, dtype=torch.float64)
    nested = nested_cosine_matrices(a, b, DIMS)
    assert nested.shape == (len(DIMS), 7, 11)
    for k, d in enumerate(DIMS):
        torch.testing.assert_close(nested[k], direct_cosines(a, b, d), rtol=0, atol=1e-12)


def test_nested_pair_cosines_equal_per_dim():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, 64, generator=g, dtype=torch.float64), torch.randn(9, 64, generator=g, dtype=torch.float64)
    nested = nested_pair_cosines(a, b, DIMS)
    for k, d in enumerate(DIMS):
        torch.testing.assert_close(nested[k], F.cosine_similarity(a[:, :d], b[:, :d], dim=-1), rtol=0, atol=1e-12)


def test_nested_cosines_keep_float32_sums_under_bf16_inputs():
    a = torch.randn(5, 64).bfloat16()
    assert nested_cosine_matrices(a, a, [64, 8]).dtype == torch.float32


def columns(seed, n_columns, batch=6, width=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, width, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n_columns)]


@pytest.mark.parametrize("n_columns", [2, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rows", [None, [1, 2, 3]])
def test_nested_contrastive_equals_the_loss_at_each_dim(n_columns, symmetric, rows):
    embeddings = columns(n_columns, n_columns)
    rows = None if rows is None else torch.tensor(rows)
    nested = contrastive_losses_nested(embeddings, dims=DIMS, scale=20.0, symmetric=symmetric, rows=rows)
    direct = torch.stack([contrastive_loss([e[:, :d] for e in embeddings], scale=20.0, symmetric=symmetric, rows=rows)
                          for d in DIMS])
    torch.testing.assert_close(nested, direct, rtol=1e-12, atol=1e-12)


def test_nested_cosent_equals_the_loss_at_each_dim():
    embeddings = columns(0, 2, batch=10)
    labels = torch.rand(10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels[3] = labels[4]  # ties are never ordered pairs
    nested = cosent_losses_nested(embeddings, labels, dims=DIMS, scale=20.0)
    direct = torch.stack([cosent_loss([e[:, :d] for e in embeddings], labels, scale=20.0) for d in DIMS])
    torch.testing.assert_close(nested, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["contrastive", "cosent"])
@pytest.mark.parametrize("dims_per_step", [None, 2])
def test_matryoshka_loss_nested_path_equals_the_loop_in_value_and_gradient(name, dims_per_step):
    base, nested = {"contrastive": (contrastive_loss, contrastive_losses_nested),
                    "cosent": (cosent_loss, cosent_losses_nested)}[name]
    embeddings = columns(3, 3 if name == "contrastive" else 2, batch=8)
    labels = torch.rand(8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = [1.0, 0.5, 2.0, 1.0, 0.25]
    results = []
    for nested_loss in (None, partial(nested, scale=20.0)):
        random.seed(7)  # the same dims drawn on both paths
        loss_fn = MatryoshkaLoss(partial(base, scale=20.0), DIMS, weights, nested_loss=nested_loss)
        dims = DimSampler(DIMS, dims_per_step)() if dims_per_step else loss_fn.dims
        parts = loss_fn(embeddings, labels if name == "cosent" else None, dims=dims)
        grads = torch.autograd.grad(parts.total, embeddings)
        results.append((parts.total, parts.per_dim, grads))
    (total_loop, per_dim_loop, grads_loop), (total_nested, per_dim_nested, grads_nested) = results
    assert per_dim_loop.keys() == per_dim_nested.keys()
    torch.testing.assert_close(total_nested, total_loop, rtol=1e-12, atol=1e-12)
    for d in per_dim_loop:
        torch.testing.assert_close(per_dim_nested[d], per_dim_loop[d], rtol=1e-12, atol=1e-12)
    for g_nested, g_loop in zip(grads_nested, grads_loop):
        torch.testing.assert_close(g_nested, g_loop, rtol=1e-10, atol=1e-12)


class TensorsFromPythonData(TorchDispatchMode):
    """Counts the tensors made from Python data (torch.tensor, new_tensor, indexing with a list): on a GPU each
    is a host-to-device copy that waits for the GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["cosent", "contrastive"])
@pytest.mark.parametrize("weights", [[1.0, 2.0, 0.5, 1.0, 3.0], "learned"])
def test_a_training_step_of_the_nested_loss_makes_no_tensor_from_python_data(name, weights):
    """Its index and weight tensors are made on the first step only (mrl.loss.device.device_constant)."""
    nested = {"cosent": cosent_losses_nested, "contrastive": contrastive_losses_nested}[name]
    base = {"cosent": cosent_loss, "contrastive": contrastive_loss}[name]
    loss_fn = (LearnedWeightsMatryoshkaLoss(base, DIMS, nested_loss=nested) if weights == "learned"
               else MatryoshkaLoss(base, DIMS, weights, nested_loss=nested))
    g = torch.Generator().manual_seed(0)
    embeddings = [torch.randn(6, 64, generator=g, requires_grad=True) for _ in range(2 if name == "cosent" else 3)]
    labels = torch.rand(6, generator=g)
    device_constant.cache_clear()  # as in a new process: the first step makes them
    steps = []
    for _ in range(2):
        with TensorsFromPythonData() as made:
            loss_fn(embeddings, labels, dims=loss_fn.dims).total.backward()
        steps.append(made.count)
    assert steps[0] > 0 and steps[1] == 0, steps  # the first step makes them: the check sees them


def test_device_constant_keys_on_dtype_and_survives_a_first_call_under_inference_mode():
    device_constant.cache_clear()
    with torch.inference_mode():  # e.g. an evaluation that computes the loss first
        first = device_constant((0, 2), torch.device("cpu"), torch.long)
    assert not first.is_inference()
    x = torch.randn(3, 4, requires_grad=True)
    x[:, first].sum().backward()  # usable in training afterwards
    assert device_constant((0.0, 2.0), torch.device("cpu"), torch.float32).dtype == torch.float32
    assert device_constant((0, 2), torch.device("cpu"), torch.long) is first
