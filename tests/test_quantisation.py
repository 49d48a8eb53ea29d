"""Quantisation-aware Matryoshka (loss.quantisation): the quantised prefix terms, computed in one nested call per
precision, equal a per-dim, per-precision loop in float64 (values and gradients); the regularisers equal their
formulas; gradients stay finite at zero vectors; bad settings fail naming the field.

Each reference is written from the docstring of mrl/loss/quantisation.py, not from its code."""

from functools import partial

import pytest
import torch

from mrl.loss.base import LOSSES
from mrl.loss.matryoshka import MatryoshkaLoss
from mrl.loss.nested import NESTED_LOSSES
from mrl.loss.objective import Objective
from mrl.loss.quantisation import QuantisedPrefixes
from mrl.run.config import load_config

LEVELS = {"int8": 255, "int4": 15}


def columns(seed, n_columns, batch=6, width=32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, width, generator=generator, dtype=torch.float64, requires_grad=True)
            for _ in range(n_columns)]


def calibration_ranges(seed, width=32, rows=40):
    """max |x_c| over unit rows, shrunk a little so that some coordinates of the batch fall outside (clamped); in
    float32, as the loss keeps them."""
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (0.8 * (x / x.norm(dim=-1, keepdim=True)).abs().amax(0)).float().double()


def stored_prefix(x, ranges, d, precision):
    """The d-prefix of the unit full-width x as a store holds it, quantised at that prefix alone, straight-through
    written the other way: x + sg(Q(x) − x)."""
    unit = x / x.norm(dim=-1, keepdim=True)
    prefix = unit[:, :d]
    if precision == "binary":
        q = torch.where(prefix > 0, torch.ones_like(prefix), -torch.ones_like(prefix))
    else:
        m = (LEVELS[precision] - 1) // 2
        step = ranges[:d] / m
        q = torch.clamp(torch.round(prefix / step), -m, m) * step
    return prefix + (q - prefix).detach()


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def loop_reference(name, embeddings, labels, dims, weights, ranges, **kwargs):
    """Σ_d L_d + Σ_p λ_p Σ_d L_base(normalize(Q_p(prefix d))): a base-loss call per dim and per precision."""
    base = partial(LOSSES[name], scale=20.0, **kwargs)
    total = sum(base([unit(e[:, :d]) for e in embeddings], labels) for d in dims)
    terms = {}
    for precision, weight in weights.items():
        for d in dims:
            terms[f"{precision}_d{d}"] = base([unit(stored_prefix(e, ranges, d, precision)) for e in embeddings],
                                              labels)
            total = total + weight * terms[f"{precision}_d{d}"]
    return total, terms


def quantised(name, dims, weights, ranges, regulariser=None, regulariser_weight=0.0):
    base, nested = partial(LOSSES[name], scale=20.0), partial(NESTED_LOSSES[name], scale=20.0)
    return QuantisedPrefixes(MatryoshkaLoss(base, dims, nested_loss=nested), nested, weights, 32, ranges,
                             regulariser, regulariser_weight)


WEIGHTS = {"int8": 0.5, "int4": 1.5, "binary": 0.7}


@pytest.mark.parametrize("n_columns, rows", [(2, None), (3, None), (3, [1, 4])])
def test_contrastive_terms_equal_the_per_dim_per_precision_loop(n_columns, rows):
    dims, embeddings, ranges = [32, 16, 8, 3], columns(0, n_columns), calibration_ranges(0)
    kwargs = {} if rows is None else {"rows": torch.tensor(rows)}
    parts = quantised("contrastive", dims, WEIGHTS, ranges)(embeddings, dims=dims, **kwargs)
    expected, terms = loop_reference("contrastive", embeddings, None, dims, WEIGHTS, ranges, **kwargs)
    torch.testing.assert_close(parts.total, expected, rtol=1e-12, atol=1e-12)
    assert list(parts.per_dim) == dims  # the float dims; the quantised terms are terms
    assert list(parts.terms) == list(terms)
    for key, value in terms.items():
        torch.testing.assert_close(parts.terms[key], value.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(parts.total, embeddings), torch.autograd.grad(expected, embeddings)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_cosent_terms_equal_the_per_dim_per_precision_loop():
    dims, embeddings, ranges = [32, 12, 4], columns(1, 2, batch=9), calibration_ranges(1)
    labels = torch.rand(9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    parts = quantised("cosent", dims, WEIGHTS, ranges)(embeddings, labels, dims=[12, 4])  # some of the dims
    expected, terms = loop_reference("cosent", embeddings, labels, [12, 4], WEIGHTS, ranges)
    torch.testing.assert_close(parts.total, expected, rtol=1e-12, atol=1e-12)
    assert set(parts.terms) == set(terms) and list(parts.per_dim) == [12, 4]
    for got, want in zip(torch.autograd.grad(parts.total, embeddings), torch.autograd.grad(expected, embeddings)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_quantised_values_are_the_stored_codes():
    """The term sees exactly the store's values: int8 / int4 codes in −m..m times the step, ±1 signs."""
    from mrl.loss.quantisation import quantise, straight_through

    x, ranges = unit(columns(2, 1)[0]).detach(), calibration_ranges(2)
    for precision, m in (("int8", 127), ("int4", 7)):
        q = straight_through(x, ranges, precision)
        codes = q / (ranges / m)
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-9)
        assert codes.round().abs().max() == m  # some coordinates are clamped to the range
        assert torch.equal(q, quantise(x, ranges, precision))  # the value exactly, not x + (Q − x)
    signs = straight_through(x, None, "binary")
    assert set(signs.unique().tolist()) == {-1.0, 1.0}


def test_binary_cosine_is_the_scaled_hamming_similarity():
    a, b = (torch.where(unit(x).detach() > 0, 1.0, -1.0).double() for x in columns(3, 2))
    for d in (32, 8, 3):
        hamming = (a[:, :d] != b[:, :d]).sum(-1).double()
        cos = (unit(a[:, :d]) * unit(b[:, :d])).sum(-1)
        torch.testing.assert_close(cos, 1 - 2 * hamming / d)
        torch.testing.assert_close(cos, (a[:, :d] * b[:, :d]).sum(-1) / d)


def spread_out_reference(x, d):
    """GOR by explicit pairs i != j of one column."""
    u = unit(x[:, :d])
    pairs = [(u[i] @ u[j]) for i in range(len(u)) for j in range(len(u)) if i != j]
    m1 = sum(pairs) / len(pairs)
    m2 = sum(p ** 2 for p in pairs) / len(pairs)
    return m1 ** 2 + torch.clamp(m2 - 1 / d, min=0)


def orthogonality_reference(x, d):
    """‖(d/n)·XᵀX − I‖²_F / d², the d × d form over the coordinates."""
    u = unit(x[:, :d])
    return ((d / len(u)) * u.T @ u - torch.eye(d, dtype=u.dtype)).pow(2).sum() / d ** 2


@pytest.mark.parametrize("name, reference", [("spread_out", spread_out_reference),
                                             ("orthogonality", orthogonality_reference)])
def test_regularisers_equal_their_formulas(name, reference):
    dims, embeddings = [32, 16, 4], columns(4, 3, batch=7)
    loss = quantised("contrastive", dims, {}, None, regulariser=name, regulariser_weight=0.3)
    parts = loss(embeddings, dims=dims)
    values = [sum(reference(e, d) for e in embeddings) / 3 for d in dims]  # averaged over the columns
    plain = MatryoshkaLoss(partial(LOSSES["contrastive"], scale=20.0), dims)(embeddings, dims=dims).total
    expected = plain + 0.3 * sum(values)
    torch.testing.assert_close(parts.total, expected, rtol=1e-11, atol=1e-12)
    for d, value in zip(dims, values):
        torch.testing.assert_close(parts.terms[f"{name}_d{d}"], value.detach(), rtol=1e-11, atol=1e-12)
    for got, want in zip(torch.autograd.grad(parts.total, embeddings), torch.autograd.grad(expected, embeddings)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_spread_out_of_one_row_is_zero_and_orthogonality_is_not():
    """One row has no pair of different rows: spread-out is 0 at every dim; orthogonality still has its d x d form."""
    from mrl.loss.quantisation import regularisers
    one = [e[:1] for e in columns(4, 2)]
    torch.testing.assert_close(regularisers("spread_out", one, [32, 4]), torch.zeros(2, dtype=torch.float64))
    values = regularisers("orthogonality", one, [32, 4])
    expected = torch.stack([sum(orthogonality_reference(e, d) for e in one) / 2 for d in (32, 4)])
    torch.testing.assert_close(values, expected.detach(), rtol=1e-11, atol=1e-12)
    assert (values > 0).all()


@pytest.mark.parametrize("name", ["contrastive", "cosent"])
def test_gradients_are_finite_at_zero_vectors(name):
    """A zero embedding: its int codes are 0 (a zero prefix, its norm floored), its binary code all −1."""
    embeddings = [e.detach().clone() for e in columns(5, 2)]
    for e in embeddings:
        e[2] = 0.0
        e[4, :8] = 0.0  # a zero prefix in a non-zero vector
        e.requires_grad_()
    labels = torch.rand(6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for regulariser in ("spread_out", "orthogonality"):
        loss = quantised(name, [32, 8, 4], WEIGHTS, calibration_ranges(5), regulariser, 1.0)
        parts = loss(embeddings, labels if name == "cosent" else None, dims=[32, 8, 4])
        grads = torch.autograd.grad(parts.total, embeddings)
        assert torch.isfinite(parts.total) and all(torch.isfinite(g).all() for g in grads)


def test_the_objective_builds_the_option_and_leaves_the_default_alone():
    assert Objective(load_config(None, []).loss, 384).quantised is None
    config = load_config(None, ["loss.name=contrastive", "loss.dims=[32,16]", "loss.quantisation.binary=1",
                                "loss.quantisation.regulariser=orthogonality",
                                "loss.quantisation.regulariser_weight=0.5", "loss.distill.weight=1"])
    objective = Objective(config.loss, 32)
    assert objective.quantised is not None and not objective.quantised.needs_ranges  # binary: no ranges
    parts = objective(columns(6, 2))
    assert list(parts.per_dim) == [32, 16]
    assert list(parts.terms) == ["binary_d32", "binary_d16", "orthogonality_d32", "orthogonality_d16", "distill_d16"]


def test_int_precisions_refuse_to_train_without_ranges():
    config = load_config(None, ["loss.dims=[32,16]", "loss.quantisation.int4=1"]).loss
    objective = Objective(config, 32)
    labels = torch.rand(6, dtype=torch.float64)
    with pytest.raises(ValueError, match="loss.quantisation: the int8 / int4 ranges were never calibrated"):
        objective(columns(7, 2), labels)
    fixed = Objective(load_config(None, ["loss.dims=[32,16]", "loss.quantisation.int4=1",
                                         "loss.quantisation.range=0.4"]).loss, 32)
    assert torch.equal(fixed.quantised.ranges, torch.full((32,), 0.4))
    assert torch.isfinite(fixed(columns(7, 2), labels).total)


@pytest.mark.parametrize("override, message", [
    ("loss.quantisation.int2=1", "loss.quantisation.int2: unknown config key; expected one of"),
    ("loss.quantisation.int8=-1", "loss.quantisation.int8: must be >= 0, got -1.0"),
    ("loss.quantisation.binary=-0.5", "loss.quantisation.binary: must be >= 0, got -0.5"),
    ("loss.quantisation.regulariser_weight=-1", "loss.quantisation.regulariser_weight: must be >= 0"),
    ("loss.quantisation.range=inf", "loss.quantisation.range: expected a finite number, got 'inf'"),
    ("loss.quantisation.range=.nan", "loss.quantisation.range: expected a finite number"),
    ("loss.quantisation.range=0", "loss.quantisation.range: must be > 0"),
    ("loss.quantisation.calibration_rows=0", "loss.quantisation.calibration_rows: must be >= 1"),
    ("loss.quantisation.regulariser=entropy", "loss.quantisation.regulariser: expected spread_out | orthogonality"),
    ("loss.quantisation.regulariser=spread_out", "loss.quantisation.regulariser_weight: must be > 0 with a regul"),
    ("loss.quantisation.regulariser_weight=1", "loss.quantisation.regulariser_weight: must be > 0 with a regul"),
])
def test_bad_settings_fail_naming_the_field(override, message):
    with pytest.raises((ValueError, TypeError), match=message.replace(".", r"\.").replace("|", r"\|")):
        load_config(None, ["loss.quantisation.int8=1", override] if "int8=-1" not in override else [override])


def test_a_range_without_an_int_precision_is_refused():
    with pytest.raises(ValueError, match=r"loss\.quantisation\.range: sets the int8 / int4 ranges"):
        load_config(None, ["loss.quantisation.binary=1", "loss.quantisation.range=0.3"])
