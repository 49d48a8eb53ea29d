"""mrl.loss.base and mrl.loss.matryoshka against independent float64 loop formulas, and against sentence-transformers."""

import functools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrl import MatryoshkaLoss, check_dims, contrastive_loss, cosent_loss, cosine_matrix
from mrl.cli import naming
from mrl.run.config import load_config
from mrl.loss.variants import DimSampler

# --- independent reference formulas: explicit loops over scalars, float64 ------------------------------------


def loop_cos(u, v):
    dot = sum(u[t] * v[t] for t in range(len(u)))
    nu = torch.sqrt(sum(u[t] * u[t] for t in range(len(u))))
    nv = torch.sqrt(sum(v[t] * v[t] for t in range(len(v))))
    return dot / (nu * nv)


def loop_logsumexp(values):
    m = max(float(v.detach()) for v in values)  # a constant shift, for stability
    return m + torch.log(sum(torch.exp(v - m) for v in values))


def loop_contrastive(embeddings, scale=20.0, symmetric=False):
    """-1/B Σ_i log softmax over candidates [p; n_1; ...; n_k] of s·cos(q_i, ·), at index i."""
    q, columns = embeddings[0], embeddings[1:]
    B = len(q)
    candidates = [row for column in columns for row in column]
    forward = 0.0
    for i in range(B):
        logits = [scale * loop_cos(q[i], c) for c in candidates]
        forward = forward - (logits[i] - loop_logsumexp(logits))
    forward = forward / B
    if not symmetric:
        return forward
    p = columns[0]
    backward = 0.0
    for i in range(B):
        logits = [scale * loop_cos(p[i], q[j]) for j in range(B)]
        backward = backward - (logits[i] - loop_logsumexp(logits))
    backward = backward / B
    return (forward + backward) / 2


def loop_cosent(embeddings, labels, scale=20.0):
    """log(1 + Σ_{i,j: y_i > y_j} exp(s·(c_j − c_i)))."""
    a, b = embeddings
    B = len(a)
    c = [loop_cos(a[i], b[i]) for i in range(B)]
    terms = [torch.zeros((), dtype=a.dtype)]
    for i in range(B):
        for j in range(B):
            if float(labels[i]) > float(labels[j]):
                terms.append(scale * (c[j] - c[i]))
    return loop_logsumexp(terms)


def random_columns(seed, n_columns, B, D, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(n_columns)]


# --- cosine_matrix ---------------------------------------------------------------------------------------------


def test_cosine_matrix_matches_loop():
    a, b = random_columns(0, 2, 4, 5)
    b = b[:3]
    m = cosine_matrix(a, b)
    assert m.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            assert float(m[i, j]) == pytest.approx(float(loop_cos(a[i], b[j])), abs=1e-12)


# --- contrastive_loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_negatives", [0, 1, 2])
@pytest.mark.parametrize("seed,B,D", [(0, 1, 3), (1, 4, 8), (2, 7, 5)])
@pytest.mark.parametrize("scale", [20.0, 1.0])
def test_contrastive_matches_loop(n_negatives, seed, B, D, scale):
    embeddings = random_columns(seed, 2 + n_negatives, B, D)
    expected = loop_contrastive(embeddings, scale=scale)
    got = contrastive_loss(embeddings, scale=scale)
    assert got.dim() == 0
    assert float(got) == pytest.approx(float(expected), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("n_negatives", [0, 1, 2])
@pytest.mark.parametrize("seed,B,D", [(3, 2, 4), (4, 5, 6)])
def test_contrastive_symmetric_matches_loop(n_negatives, seed, B, D):
    embeddings = random_columns(seed, 2 + n_negatives, B, D)
    expected = loop_contrastive(embeddings, scale=20.0, symmetric=True)
    got = contrastive_loss(embeddings, scale=20.0, symmetric=True)
    assert float(got) == pytest.approx(float(expected), rel=1e-10, abs=1e-10)


def test_contrastive_ignores_labels_and_needs_two_columns():
    embeddings = random_columns(5, 2, 3, 4)
    assert torch.equal(contrastive_loss(embeddings), contrastive_loss(embeddings, torch.tensor([1.0, 0.0, 2.0])))
    with pytest.raises(ValueError, match="2 text columns"):
        contrastive_loss(embeddings[:1])


def test_contrastive_is_scale_invariant_per_row():
    q, p, n = random_columns(6, 3, 4, 5)
    factors = torch.rand(4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10 + 0.1
    assert float(contrastive_loss([q * factors, p, n / factors])) == pytest.approx(
        float(contrastive_loss([q, p, n])), rel=1e-10)


@pytest.mark.parametrize("n_negatives,symmetric", [(0, False), (1, False), (2, False), (0, True), (1, True)])
def test_contrastive_gradients_match_loop(n_negatives, symmetric):
    embeddings = random_columns(7 + n_negatives, 2 + n_negatives, 4, 5, requires_grad=True)
    got = torch.autograd.grad(contrastive_loss(embeddings, scale=5.0, symmetric=symmetric), embeddings)
    expected = torch.autograd.grad(loop_contrastive(embeddings, scale=5.0, symmetric=symmetric), embeddings)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n_negatives,symmetric", [(0, False), (2, False), (1, True)])
def test_contrastive_gradcheck(n_negatives, symmetric):
    embeddings = random_columns(11, 2 + n_negatives, 3, 4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *e: contrastive_loss(list(e), scale=3.0, symmetric=symmetric),
                                    tuple(embeddings))


# --- cosent_loss -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,B,D", [(0, 1, 3), (1, 2, 4), (2, 6, 8), (3, 9, 5)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scale", [20.0, 0.5])
def test_cosent_matches_loop(seed, B, D, ties, scale):
    embeddings = random_columns(seed, 2, B, D)
    g = torch.Generator().manual_seed(seed + 100)
    labels = (torch.randint(0, 3, (B,), generator=g) if ties else torch.rand(B, generator=g) * 5).double()
    expected = loop_cosent(embeddings, labels, scale=scale)
    got = cosent_loss(embeddings, labels, scale=scale)
    assert got.dim() == 0
    assert float(got) == pytest.approx(float(expected), rel=1e-10, abs=1e-12)


def test_cosent_all_ties_is_log_one():
    embeddings = random_columns(0, 2, 5, 4)
    assert float(cosent_loss(embeddings, torch.full((5,), 2.0, dtype=torch.float64))) == 0.0


def test_cosent_depends_only_on_label_order():
    embeddings = random_columns(1, 2, 6, 4)
    labels = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3, 0.0], dtype=torch.float64)
    assert float(cosent_loss(embeddings, labels * 5 + 1)) == pytest.approx(float(cosent_loss(embeddings, labels)),
                                                                            rel=1e-12)


def test_cosent_errors():
    embeddings = random_columns(2, 3, 4, 4)
    labels = torch.rand(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="exactly 2 text columns"):
        cosent_loss(embeddings, labels)
    with pytest.raises(ValueError, match="label"):
        cosent_loss(embeddings[:2], None)


@pytest.mark.parametrize("seed", [0, 1])
def test_cosent_gradients_match_loop(seed):
    embeddings = random_columns(seed, 2, 5, 4, requires_grad=True)
    labels = torch.tensor([0.0, 1.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    got = torch.autograd.grad(cosent_loss(embeddings, labels, scale=5.0), embeddings)
    expected = torch.autograd.grad(loop_cosent(embeddings, labels, scale=5.0), embeddings)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 1), (1, 4), (3,)])
def test_cosent_refuses_labels_that_are_not_one_per_pair(shape):
    """A (B, 1) column would broadcast into a (B, B) comparison: a wrong loss, no error, without this check."""
    embeddings = random_columns(3, 2, 4, 3)
    with pytest.raises(ValueError, match=r"labels of shape \(4,\)"):
        cosent_loss(embeddings, torch.rand(shape, dtype=torch.float64))
    from mrl.loss.nested import cosent_losses_nested
    with pytest.raises(ValueError, match=r"labels of shape \(4,\)"):
        cosent_losses_nested(embeddings, torch.rand(shape, dtype=torch.float64), dims=[3, 2])


def test_cosent_gradcheck():
    embeddings = random_columns(3, 2, 4, 3, requires_grad=True)
    labels = torch.tensor([0.3, 0.1, 0.8, 0.1], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: cosent_loss([a, b], labels, scale=3.0), tuple(embeddings))


# --- MatryoshkaLoss ------------------------------------------------------------------------------------------------


class RecordingLoss:
    """A base loss that is NOT scale invariant (so the normalisation shows) and records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, embeddings, labels=None):
        self.calls.append(([e.detach().clone() for e in embeddings], labels))
        coef = torch.arange(1, embeddings[0].shape[-1] + 1, dtype=embeddings[0].dtype)
        return sum(((c + 1) * (e * coef).sum()) ** 2 / 100 for c, e in enumerate(embeddings))


def hand_matryoshka(base, embeddings, labels, dims, weights):
    total = 0.0
    for d, w in zip(dims, weights):
        total = total + w * base([F.normalize(e[:, :d], dim=-1) for e in embeddings], labels)
    return total


@pytest.mark.parametrize("dims,weights", [([32, 16, 8, 4], None), ([8, 32, 4, 16], [0.5, 2.0, 1.0, 3.0]),
                                          ([5], [0.25])])
def test_matryoshka_total_is_weighted_sum_over_dims(dims, weights):
    embeddings = random_columns(0, 3, 6, 32)
    base = RecordingLoss()
    loss = MatryoshkaLoss(base, dims, weights)
    parts = loss(embeddings, dims=loss.dims)
    total, per_dim = parts.total, parts.per_dim
    expected = hand_matryoshka(RecordingLoss(), embeddings, None, dims, weights or [1.0] * len(dims))
    assert float(total) == pytest.approx(float(expected), rel=1e-12)
    assert list(per_dim) == sorted(dims, reverse=True) and parts.terms == {}
    # the base loss saw exactly normalize(e[:, :d]) for each dim, largest dim first
    assert [call[0][0].shape[-1] for call in base.calls] == sorted(dims, reverse=True)
    for seen, _ in base.calls:
        d = seen[0].shape[-1]
        for s, e in zip(seen, embeddings):
            torch.testing.assert_close(s, F.normalize(e[:, :d], dim=-1), rtol=0, atol=1e-15)
        assert float(per_dim[d]) == pytest.approx(float(RecordingLoss()(seen)), rel=1e-12)


@pytest.mark.parametrize("base_name", ["contrastive", "contrastive_sym", "cosent"])
def test_matryoshka_with_library_losses_matches_loop_formulas(base_name):
    dims, weights = [16, 4, 8], [1.0, 0.5, 2.0]
    n_columns = 2 if base_name == "cosent" else 3
    embeddings = random_columns(4, n_columns, 5, 16)
    labels = torch.tensor([0.1, 0.7, 0.3, 0.3, 0.9], dtype=torch.float64)
    base, loop = {
        "contrastive": (functools.partial(contrastive_loss, scale=10.0),
                        lambda e, y: loop_contrastive(e, scale=10.0)),
        "contrastive_sym": (functools.partial(contrastive_loss, scale=10.0, symmetric=True),
                            lambda e, y: loop_contrastive(e, scale=10.0, symmetric=True)),
        "cosent": (functools.partial(cosent_loss, scale=10.0), lambda e, y: loop_cosent(e, y, scale=10.0)),
    }[base_name]
    loss = MatryoshkaLoss(base, dims, weights)
    parts = loss(embeddings, labels, dims=loss.dims)
    total, per_dim = parts.total, parts.per_dim
    expected = 0.0
    for d, w in zip(dims, weights):
        loss_d = loop([e[:, :d] for e in embeddings], labels)  # cosine-based: normalising changes nothing
        assert float(per_dim[d]) == pytest.approx(float(loss_d), rel=1e-10)
        assert not per_dim[d].requires_grad
        expected = expected + w * loss_d
    assert float(total) == pytest.approx(float(expected), rel=1e-10)


def test_matryoshka_gradients_match_hand_loop():
    embeddings = random_columns(5, 2, 4, 12, requires_grad=True)
    labels = torch.tensor([0.0, 0.4, 0.2, 1.0], dtype=torch.float64)
    dims, weights = [12, 6, 3], [1.0, 0.3, 2.0]
    base = functools.partial(cosent_loss, scale=7.0)
    total = MatryoshkaLoss(base, dims, weights)(embeddings, labels, dims=dims).total
    got = torch.autograd.grad(total, embeddings)
    expected = torch.autograd.grad(hand_matryoshka(base, embeddings, labels, dims, weights), embeddings)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)


def test_matryoshka_dim_order_does_not_matter():
    embeddings = random_columns(1, 2, 5, 32)
    labels = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    base = functools.partial(cosent_loss, scale=20.0)
    a = MatryoshkaLoss(base, [32, 16, 8, 4], [4.0, 3.0, 2.0, 1.0])
    b = MatryoshkaLoss(base, [8, 32, 4, 16], [2.0, 4.0, 1.0, 3.0])
    assert a.dims == b.dims == [32, 16, 8, 4]
    assert a.current_weights() == b.current_weights() == {32: 4.0, 16: 3.0, 8: 2.0, 4: 1.0}
    parts_a, parts_b = a(embeddings, labels, dims=a.dims), b(embeddings, labels, dims=b.dims)
    (ta, pa), (tb, pb) = (parts_a.total, parts_a.per_dim), (parts_b.total, parts_b.per_dim)
    assert float(ta) == pytest.approx(float(tb), rel=1e-12)
    assert pa.keys() == pb.keys()
    for d in pa:
        assert float(pa[d]) == pytest.approx(float(pb[d]), rel=1e-12)


def test_matryoshka_weights_follow_their_dims_after_sorting():
    embeddings = random_columns(2, 2, 4, 16)
    base = RecordingLoss()
    loss = MatryoshkaLoss(base, [4, 16, 8], [10.0, 0.0, 1.0])
    assert loss.dims == [16, 8, 4] and list(loss.current_weights().values()) == [0.0, 1.0, 10.0]
    parts = loss(embeddings, dims=loss.dims)
    assert float(parts.total) == pytest.approx(10.0 * float(parts.per_dim[4]) + 1.0 * float(parts.per_dim[8]),
                                               rel=1e-12)
    # the default weights are all 1
    assert list(MatryoshkaLoss(base, [4, 16, 8]).current_weights().values()) == [1.0, 1.0, 1.0]
    parts = MatryoshkaLoss(RecordingLoss(), [4, 16, 8])(embeddings, dims=[16, 8, 4])
    assert float(parts.total) == pytest.approx(sum(float(v) for v in parts.per_dim.values()), rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_dim_sampler_picks_k_distinct_dims_and_the_loss_trains_those(k):
    dims = [32, 16, 8, 4, 2]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    embeddings = random_columns(3, 2, 4, 32)
    loss, sampler = MatryoshkaLoss(RecordingLoss(), dims, weights), DimSampler(dims, k)
    weight_of = dict(zip(dims, weights))
    seen = set()
    for seed in range(20):
        random.seed(seed)
        chosen = sampler()
        assert chosen == sorted(set(chosen), reverse=True) and len(chosen) == k
        parts = loss(embeddings, None, dims=chosen)
        total, per_dim = parts.total, parts.per_dim
        assert list(per_dim) == chosen and set(per_dim) <= set(dims)
        assert float(total) == pytest.approx(sum(weight_of[d] * float(v) for d, v in per_dim.items()), rel=1e-12)
        random.seed(seed)
        again = loss(embeddings, None, dims=sampler())
        assert again.per_dim.keys() == per_dim.keys() and float(again.total) == float(total)
        seen.add(frozenset(per_dim))
    if k < len(dims):
        assert len(seen) > 1  # the subset does change with the random state
    else:
        assert seen == {frozenset(dims)}


def test_matryoshka_per_dim_keys_equal_dims():
    per_dim = MatryoshkaLoss(RecordingLoss(), [3, 9, 27])(random_columns(0, 2, 3, 27), dims=[27, 9, 3]).per_dim
    assert list(per_dim) == [27, 9, 3]
    assert all(v.dim() == 0 for v in per_dim.values())


@pytest.mark.parametrize("dims", [[], [8, 64], [64, 16], [64, 64, 8]])
def test_matryoshka_refuses_dims_to_train_that_are_not_its_own_largest_first(dims):
    with pytest.raises(ValueError, match=r"dims: the dims to train must be some of \[64, 8\], largest first"):
        MatryoshkaLoss(RecordingLoss(), [64, 8])(random_columns(0, 2, 3, 64), dims=dims)


def test_matryoshka_dim_larger_than_embedding_width_raises():
    loss = MatryoshkaLoss(RecordingLoss(), [64, 8])
    with pytest.raises(ValueError, match="dims.*64"):
        loss(random_columns(0, 2, 3, 32), dims=loss.dims)
    with pytest.raises(ValueError, match=r"^loss\.dims: dim 64 is larger than the model's embedding size 32$"):
        with naming("loss.dims"):  # the check says what is wrong, its caller names the field
            check_dims([64, 8], width=32)
    check_dims([32, 8], width=32)  # equal to the width is fine


@pytest.mark.parametrize("dims,weights", [([16, 8, 16], None), ([16, 0], None), ([16, -8], None), ([16, 8.0], None),
                                          ([], None), ([16, 8], [1.0]), ([16, 8], [1.0, 1.0, 1.0]),
                                          ([16, 8], [1.0, -1.0]), ([16, 8], [1.0, float("nan")])])
def test_matryoshka_loss_refuses_bad_dims_and_weights(dims, weights):
    with pytest.raises(ValueError, match="dims|weights"):
        MatryoshkaLoss(RecordingLoss(), dims, weights)


@pytest.mark.parametrize("overrides,field", [
    (["loss.dims=[16,8,16]"], "loss.dims"), (["loss.dims=[16,0]"], "loss.dims"), (["loss.dims=[16,-8]"], "loss.dims"),
    (["loss.dims=[]"], "loss.dims"), (["loss.dims=[16,8]", "loss.dim_weights=[1.0]"], "loss.dim_weights"),
    (["loss.dims=[16,8]", "loss.dim_weights=[1,1,1]"], "loss.dim_weights"),
    (["loss.dims=[16,8]", "loss.dim_weights=[1,-1]"], "loss.dim_weights"),
    (["loss.dims=[16,8]", "loss.dim_sampling.dims_per_step=0"], "loss.dim_sampling.dims_per_step"),
    (["loss.dims=[16,8]", "loss.dim_sampling.dims_per_step=3"], "loss.dim_sampling.dims_per_step"),
])
def test_invalid_dims_and_options_fail_at_config_load_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        load_config(None, overrides)


# --- parity with sentence-transformers ------------------------------------------------------------------------------


class FixedColumns(nn.Module):
    """A module mapping the feature dict {'column': i} to the precomputed embeddings of column i."""

    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, features):
        return {"sentence_embedding": self.embeddings[features["column"]]}

    def get_embedding_dimension(self):
        return self.embeddings[0].shape[-1]


def reference_model(embeddings):
    """A real SentenceTransformer whose one module returns the given embeddings: whatever the reference's
    losses ask of a model (its embedding dimension, its forward) is the reference's own code, in any release."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=[FixedColumns(embeddings)], device="cpu")


def st_losses():
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer import losses

    return losses


def features_for(embeddings):
    return [{"column": i} for i in range(len(embeddings))]


@pytest.mark.parametrize("n_negatives", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_equals_sentence_transformers_mnrl(n_negatives, seed):
    losses = st_losses()
    embeddings = random_columns(seed, 2 + n_negatives, 8, 16, dtype=torch.float32)
    st = losses.MultipleNegativesRankingLoss(reference_model(embeddings), scale=20.0)
    expected = st.compute_loss_from_embeddings(embeddings, None)
    assert float(contrastive_loss(embeddings, scale=20.0)) == pytest.approx(float(expected), abs=1e-5)
    # and through the loss's own forward, on the reference model
    assert float(st(features_for(embeddings), None)) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.filterwarnings("ignore:The MultipleNegativesSymmetricRankingLoss is deprecated")
@pytest.mark.parametrize("n_negatives", [0, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_symmetric_contrastive_equals_sentence_transformers_symmetric_mnrl(n_negatives, seed):
    losses = st_losses()
    embeddings = random_columns(seed, 2 + n_negatives, 8, 16, dtype=torch.float32)
    model = reference_model(embeddings)
    got = contrastive_loss(embeddings, scale=20.0, symmetric=True)
    st = losses.MultipleNegativesSymmetricRankingLoss(model, scale=20.0)
    assert float(got) == pytest.approx(float(st.compute_loss_from_embeddings(embeddings, None)), abs=1e-5)
    # its documented replacement
    st = losses.MultipleNegativesRankingLoss(model, scale=20.0, directions=("query_to_doc", "doc_to_query"),
                                             partition_mode="per_direction")
    assert float(got) == pytest.approx(float(st.compute_loss_from_embeddings(embeddings, None)), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosent_equals_sentence_transformers_cosent(seed):
    losses = st_losses()
    embeddings = random_columns(seed, 2, 10, 16, dtype=torch.float32)
    labels = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(seed)).float() / 3  # with ties
    st = losses.CoSENTLoss(reference_model(embeddings), scale=20.0)
    expected = st.compute_loss_from_embeddings(embeddings, labels)
    assert float(cosent_loss(embeddings, labels, scale=20.0)) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("base_name", ["contrastive", "cosent"])
@pytest.mark.parametrize("dims,weights", [([32, 16, 8, 4], None), ([8, 32, 16], [0.5, 1.0, 2.0])])
def test_matryoshka_equals_sentence_transformers_matryoshka(base_name, dims, weights):
    losses = st_losses()
    n_columns = 2 if base_name == "cosent" else 3
    embeddings = random_columns(3, n_columns, 8, 32, dtype=torch.float32, requires_grad=True)
    labels = torch.rand(8, generator=torch.Generator().manual_seed(3))
    model = reference_model(embeddings)
    if base_name == "cosent":
        st_base, ours_base = losses.CoSENTLoss(model, scale=20.0), functools.partial(cosent_loss, scale=20.0)
    else:
        st_base = losses.MultipleNegativesRankingLoss(model, scale=20.0)
        ours_base = functools.partial(contrastive_loss, scale=20.0)
    st = losses.MatryoshkaLoss(model, st_base, dims, matryoshka_weights=weights)
    expected = st(features_for(embeddings), labels)
    expected_grads = torch.autograd.grad(expected, embeddings)
    ours = MatryoshkaLoss(ours_base, dims, weights)
    total = ours(embeddings, labels, dims=ours.dims).total
    grads = torch.autograd.grad(total, embeddings)
    assert float(total.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_dim_sampler_equals_sentence_transformers_n_dims_per_step(k):
    """Both draw random.sample(range(len(dims)), k): under the same seed they train the same dims."""
    losses = st_losses()
    embeddings = random_columns(4, 2, 6, 32)  # float64: the weighted totals reach ~100
    labels = torch.rand(6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = reference_model(embeddings)
    dims, weights = [32, 16, 8, 4], [1.0, 2.0, 3.0, 4.0]
    st = losses.MatryoshkaLoss(model, losses.CoSENTLoss(model), dims, matryoshka_weights=weights, n_dims_per_step=k)
    ours, sampler = MatryoshkaLoss(functools.partial(cosent_loss, scale=20.0), dims, weights), DimSampler(dims, k)
    for seed in range(5):
        random.seed(seed)
        expected = st(features_for(embeddings), labels)
        random.seed(seed)
        total = ours(embeddings, labels, dims=sampler()).total
        assert float(total) == pytest.approx(float(expected), abs=1e-5)


def test_loop_reference_is_sane():
    """The loop formulas themselves: perfect retrieval at a high scale gives ~0, a uniform batch log(B)."""
    q = torch.eye(4, dtype=torch.float64)
    assert float(loop_contrastive([q, q.clone()], scale=100.0)) == pytest.approx(0.0, abs=1e-30)
    same = torch.ones(4, 3, dtype=torch.float64)
    assert float(loop_contrastive([same, same.clone()], scale=20.0)) == pytest.approx(math.log(4), rel=1e-12)
    labels = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    assert float(loop_cosent([same, same.clone()], labels)) == pytest.approx(math.log(1 + 6), rel=1e-12)
