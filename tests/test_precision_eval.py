"""Evaluation at every dim × precision (issue 29, part 2): int4 storage, STS stored and rescored, the retrieval
table with Recall@100 and float rescoring, and retention; each against a formula written out here."""

import math

import pytest
import torch
from scipy.stats import spearmanr

from mrl.eval.precision import by_storage, quantization_table
from mrl.eval.report import retention
from mrl.eval.sts import sts_spearman_by_dim
from mrl.retrieval.data import RetrievalSet
from mrl.retrieval.quantize import quantized_search, storage_bytes, stored


def random_rows(seed, n, width=24):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def by_hand(x, d, precision):
    """A store's rows, by the formulas: the unit prefix; codes round(x/s) in −m..m with s_c = max_i |x_ic| / m
    over these rows; or signs ±1 (x > 0: +1)."""
    rows = []
    unit = [[v / math.sqrt(sum(w * w for w in row[:d])) for v in row[:d]] for row in x.double().tolist()]
    if precision == "binary":
        return torch.tensor([[1.0 if v > 0 else -1.0 for v in row] for row in unit], dtype=torch.float64)
    m = {"int8": 127, "int4": 7}[precision]
    steps = [max(abs(row[c]) for row in unit) / m for c in range(d)]
    for row in unit:
        rows.append([max(-m, min(m, round(v / s))) * s for v, s in zip(row, steps)])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("precision", ["int8", "int4", "binary"])
def test_stored_rows_are_the_codes_of_the_formula(precision):
    x = random_rows(0, 30)
    for d in (24, 10, 3):
        got = stored(x, d, precision).double()
        torch.testing.assert_close(got, by_hand(x, d, precision), rtol=0, atol=1e-6)
    assert storage_bytes("int4", 24) == 12 and storage_bytes("int4", 7) == 4


def test_int4_codes_take_fifteen_levels():
    x = random_rows(1, 200)
    steps = stored(x, 24, "int4") / by_hand(x, 24, "int4").abs().amax(0).float() * 7
    assert steps.round().unique().numel() == 15  # −7..7


@pytest.mark.parametrize("precision", ["int8", "int4", "binary"])
def test_sts_at_each_precision_is_spearman_of_the_stored_cosines(precision):
    a = random_rows(2, 40)
    b = a + 0.9 * random_rows(3, 40)
    gold = torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(4)).float().tolist()
    both = torch.cat([a, b])  # one store holds both sentences of every pair: calibrated together
    for rescore in (False, True):
        got = sts_spearman_by_dim(a, b, gold, [24, 8, 2], precision, rescore=rescore)
        for d in (24, 8, 2):
            rows = by_hand(both, d, precision)
            x, y = rows[:40], rows[40:]
            if rescore:  # the first sentence in float
                x = a[:, :d].double()
            cos = [round(float(u @ v / (u.norm() * v.norm())), 12) for u, v in zip(x, y)]  # exact ties stay ties
            assert got[d] == pytest.approx(100 * spearmanr(cos, gold).statistic, abs=1e-9)
    assert sts_spearman_by_dim(a, b, gold, [8], "float32", rescore=True) == sts_spearman_by_dim(a, b, gold, [8])


def retrieval_set(n_queries, n_docs):
    return RetrievalSet([f"q{i}" for i in range(n_queries)], [""] * n_queries, [f"d{i}" for i in range(n_docs)],
                        [""] * n_docs, {f"q{i}": {f"d{(7 * i) % n_docs}": 1, f"d{(7 * i + 3) % n_docs}": 1}
                                        for i in range(n_queries)})


def hand_metrics(order, relevant, k=100):
    """nDCG@10 and Recall@100 of one ranking (a list of doc indices), binary gains."""
    ranked = [f"d{i}" for i in order]
    dcg = sum(1 / math.log2(i + 2) for i, doc in enumerate(ranked[:10]) if doc in relevant)
    idcg = sum(1 / math.log2(i + 2) for i in range(min(10, len(relevant))))
    return dcg / idcg, len(relevant & set(ranked[:k])) / len(relevant)


def test_the_retrieval_table_scores_each_storage_by_its_own_ranking():
    queries, docs = random_rows(5, 12), random_rows(6, 300)
    data = retrieval_set(12, 300)
    rows = quantization_table(queries, docs, data, [24, 6])
    assert [r["storage"] for r in rows[:7]] == [
        "float32", "int8", "int8 + float rescoring of top 4×100", "int4", "int4 + float rescoring of top 4×100",
        "binary", "binary + float rescoring of top 4×100"]
    for row in rows:
        d, precision = row["dim"], row["precision"]
        q = by_hand(queries, d, "binary") if precision == "binary" else \
            torch.nn.functional.normalize(queries[:, :d].double(), dim=-1)  # int: float queries
        c = by_hand(docs, d, precision) if precision != "float32" else \
            torch.nn.functional.normalize(docs[:, :d].double(), dim=-1)
        scores = q @ c.T  # (12, 300): the first stage
        if row["rescored"]:  # the best 400 re-scored in float
            floats = torch.nn.functional.normalize(queries[:, :d].double(), dim=-1) @ \
                torch.nn.functional.normalize(docs[:, :d].double(), dim=-1).T
            shortlist = scores.topk(400 if len(docs) >= 400 else len(docs), dim=1).indices
            scores = torch.full_like(scores, -math.inf).scatter(1, shortlist, floats.gather(1, shortlist))
        if precision == "binary" and not row["rescored"]:  # Hamming ties: which of them comes first is the search's
            got, _ = quantized_search(queries, docs, d, "binary", k=100)
            torch.testing.assert_close(got.double(), scores.topk(100, dim=1).values)
            continue
        orders = scores.argsort(dim=1, descending=True)[:, :100].tolist()
        metrics = [hand_metrics(order, set(data.qrels[f"q{i}"])) for i, order in enumerate(orders)]
        assert row["ndcg@10"] == pytest.approx(100 * sum(m[0] for m in metrics) / 12, abs=1e-6), row["storage"]
        assert row["recall@100"] == pytest.approx(100 * sum(m[1] for m in metrics) / 12, abs=1e-6), row["storage"]
        assert row["bytes"] == storage_bytes(precision, d)
    assert set(by_storage(rows)) == {"float32", "int8", "int8, rescored", "int4", "int4, rescored", "binary",
                                     "binary, rescored"}


def test_rescoring_every_document_gives_the_float_ranking():
    queries, docs = random_rows(7, 5), random_rows(8, 40)
    _, exact = quantized_search(queries, docs, 16, "float32", k=10)
    for kind in ("int8", "int4", "binary"):
        _, rescored = quantized_search(queries, docs, 16, kind, k=10, rescore=4)  # 40 = every document
        assert torch.equal(rescored, exact), kind


def test_retention_is_the_share_of_float32_at_the_full_dim():
    scores = {"float32": {32: 80.0, 8: 60.0}, "binary": {32: 72.0, 8: 40.0}}
    assert retention(scores) == {"float32": {32: 100.0, 8: 75.0}, "binary": {32: 90.0, 8: 50.0}}
