"""Retrieval metrics on hand-computed cases, exact / funnel / quantised search against plain float search."""

import json
import math

import pytest
import torch

from conftest import SHARED
from mrl.retrieval.data import RetrievalSet, load_beir, nli_retrieval_set
from mrl.retrieval.exact import _chunk_top_k, prefix, top_k
from mrl.retrieval.funnel import FunnelIndex
from mrl.retrieval.metrics import evaluate_retrieval, mrr_at_k, ndcg_at_k, recall_at_k, retrieval_metrics
from mrl.retrieval.quantize import (corpus_scales, quantize_binary, quantize_codes, quantize_int8_queries,
                                    quantized_search, storage_bytes, unpack_signs)


def test_ndcg_by_hand():
    ranked, relevant = ["d1", "d2", "d3"], {"d2": 1, "d3": 2}  # linear gains, as pytrec_eval / BEIR
    dcg = 0 + 1 / math.log2(3) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(ranked, relevant) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["d3", "d2", "d1"], relevant) == pytest.approx(1.0)
    assert ndcg_at_k(["d1", "d4"], relevant) == 0.0
    assert ndcg_at_k(["d1", "d2", "d3"], relevant, k=1) == 0.0


def test_mrr_and_recall_by_hand():
    relevant = {"d2": 1, "d3": 1, "d9": 0}  # a grade-0 judgement is not relevant
    assert mrr_at_k(["d1", "d2", "d3"], relevant) == 0.5
    assert mrr_at_k(["d1", "d9"], relevant) == 0.0
    assert mrr_at_k(["d1"] * 10 + ["d2"], relevant, k=10) == 0.0
    assert recall_at_k(["d1", "d2"], relevant, 2) == 0.5
    assert recall_at_k(["d3", "d2"], relevant, 2) == 1.0


def test_retrieval_metrics_average_over_queries():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    metrics = retrieval_metrics({"q1": ["a", "b"], "q2": ["a", "b"]}, qrels)
    assert metrics["mrr@10"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert metrics["recall@10"] == pytest.approx(100.0)
    assert metrics["ndcg@10"] == pytest.approx(100 * (1 + 1 / math.log2(3)) / 2)


def random_unit(n, d, seed):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_chunked_top_k_equals_full_sort():
    q, c = random_unit(7, 32, 0), random_unit(1000, 32, 1)
    scores, index = top_k(q, c, 15, chunk_size=64)
    full_scores, full_index = (q @ c.T).topk(15, dim=1)
    assert torch.equal(index, full_index)
    torch.testing.assert_close(scores, full_scores)
    assert top_k(q, c[:5], 15)[1].shape == (7, 5)  # k larger than the corpus: everything, ranked


def test_funnel_equals_exact_search_when_every_stage_keeps_everything():
    q, c = random_unit(9, 64, 2), random_unit(500, 64, 3)
    stages = [(8, 500), (32, 500), (64, 10)]
    index = FunnelIndex(c, [d for d, _ in stages])
    _, funnel = index.search(q, stages)
    _, exact = top_k(prefix(q, 64), prefix(c, 64), 10)
    assert torch.equal(funnel, exact)
    assert index.flops_per_query(stages) == 2 * (500 * 8 + 500 * 32 + 500 * 64)


def test_funnel_with_a_shortlist_scores_its_survivors_exactly():
    q, c = random_unit(4, 64, 4), random_unit(300, 64, 5)
    scores, index = FunnelIndex(c, [16, 64]).search(q, [(16, 50), (64, 5)])
    torch.testing.assert_close(scores, torch.einsum("qd,qkd->qk", prefix(q, 64), prefix(c, 64)[index]))
    shortlist = top_k(prefix(q, 16), prefix(c, 16), 50)[1]
    assert all(set(row) <= set(s) for row, s in zip(index.tolist(), shortlist.tolist()))


def test_int8_scores_are_within_the_rounding_bound():
    q, c = prefix(random_unit(5, 64, 6), 64), prefix(random_unit(200, 64, 7), 64)
    scales = corpus_scales(c)
    codes = quantize_codes(c, scales)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    error = ((codes.float() * scales) @ q.T - c @ q.T).abs()
    bound = (q.abs() * scales / 2).sum(1)  # each dim is off by at most half a step
    assert (error <= bound[None, :] + 1e-6).all()
    assert error.max() > 0  # it is a quantisation


def test_binary_pack_unpack_and_hamming():
    x = torch.randn(6, 13, generator=torch.Generator().manual_seed(8))
    packed = quantize_binary(x)
    assert packed.shape == (6, 2) and packed.dtype == torch.uint8 and storage_bytes("binary", 13) == 2
    signs = unpack_signs(packed, 13)
    assert torch.equal(signs, torch.where(x > 0, 1.0, -1.0))
    hamming = torch.tensor([[sum((a > 0) != (b > 0) for a, b in zip(u, v)) for v in x] for u in x], dtype=torch.float)
    torch.testing.assert_close(signs @ signs.T, 13 - 2 * hamming)


def test_binary_with_full_rescoring_equals_float_search():
    q, c = random_unit(5, 64, 9), random_unit(100, 64, 10)
    _, exact = quantized_search(q, c, 32, "float32", k=10)
    _, rescored = quantized_search(q, c, 32, "binary", k=10, rescore=10)  # rescoring all 100 documents
    assert torch.equal(rescored, exact)
    _, binary_only = quantized_search(q, c, 32, "binary", k=10)
    assert not torch.equal(binary_only, exact)


def test_load_beir_and_evaluate(tmp_path):
    (tmp_path / "qrels").mkdir()
    docs = [{"_id": "a", "title": "T", "text": "alpha"}, {"_id": "b", "text": "beta"}, {"_id": "c", "text": "gamma"}]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "first"}\n{"_id": "q2", "text": "unjudged"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tb\t1\n")
    data = load_beir(str(tmp_path))
    assert data.query_ids == ["q1"] and data.docs == ["T alpha", "beta", "gamma"]
    # embeddings that rank b first at 2 dims but last at 1 dim
    docs_emb = torch.tensor([[1.0, 0.0], [-0.1, 1.0], [0.5, -1.0]])
    query_emb = torch.tensor([[0.2, 1.0]])
    results = evaluate_retrieval(query_emb, docs_emb, data, [2, 1])
    assert results[2]["mrr@10"] == 100.0 and results[2]["ndcg@10"] == pytest.approx(100.0)
    assert results[1]["mrr@10"] == pytest.approx(100 / 3)  # at 1 dim, b's prefix is -1: ranked last


def test_nli_retrieval_set_from_shared():
    files = [SHARED / "data" / "nli" / "triplets.jsonl.gz", SHARED / "data" / "nli" / "triplets-extra.jsonl.gz"]
    if not all(f.exists() for f in files):
        pytest.skip("no NLI triplets in ../shared")
    data = nli_retrieval_set([str(f) for f in files], n_queries=200)
    assert isinstance(data, RetrievalSet) and len(data.queries) == 200 == len(set(data.queries))
    assert len(data.docs) == len(set(data.docs)) > 20_000
    text = dict(zip(data.doc_ids, data.docs))
    import gzip
    rows = [json.loads(line) for f in files for line in gzip.open(f, "rt")]
    positives = {}
    for r in rows:
        positives.setdefault(r["anchor"], set()).add(r["positive"])
    for q, anchor in zip(data.query_ids, data.queries):
        assert {text[d] for d in data.qrels[q]} == positives[anchor]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_low_precision_shortlist_keeps_the_float32_order_of_its_survivors(dtype):
    q, c = random_unit(6, 64, 11), random_unit(400, 64, 12)
    exact_scores, exact = top_k(prefix(q, 64), prefix(c, 64), 10)
    scores, index = FunnelIndex(c, [16, 64], shortlist_dtype=dtype).search(q, [(16, 400), (64, 10)])
    assert torch.equal(index, exact)  # the shortlist keeps everything: only float32 decides
    assert scores.dtype == torch.float32


def test_int8_top_k_is_exact_on_the_codes():
    """int8 queries against int8 codes: the int32 dot products of the codes, their top k exactly (chunked,
    grouped selection, and a last chunk shorter than the others)."""
    c = prefix(random_unit(20_000, 32, 18), 32)
    scales = corpus_scales(c)
    codes, query_codes = quantize_codes(c, scales), quantize_int8_queries(prefix(random_unit(7, 32, 19), 32), scales)
    scores, index = top_k(query_codes, codes, 25, chunk_size=8192)
    full = query_codes.long() @ codes.long().T
    assert scores.dtype == torch.int32
    assert torch.equal(scores.long(), full.topk(25, dim=1).values)
    assert torch.equal(full.gather(1, index), scores.long())


def test_int8_query_codes_score_within_the_rounding_bound():
    """With q·scales quantised per query to a range a (codes Q = q·s·127/a + δ) and the corpus to codes
    X = x/s + f (|δ|, |f| <= 1/2): a/127 · Q·X differs from q·x by at most
    Σ_c |q_c s_c|/2 + (a/254)·|x_c/s_c| + a/508."""
    q, c = prefix(random_unit(5, 64, 20), 64), prefix(random_unit(300, 64, 21), 64)
    scales = corpus_scales(c)
    codes, query_codes = quantize_codes(c, scales), quantize_int8_queries(q, scales)
    assert query_codes.dtype == torch.int8 and query_codes.abs().max() == 127
    a = (q * scales).abs().amax(1, keepdim=True)  # (Q, 1): each query's range
    approx = a / 127 * (query_codes.float() @ codes.float().T)
    bound = ((q * scales).abs() / 2).sum(1, keepdim=True) + a / 254 * (c / scales).abs().sum(1) + a / 508 * 64
    error = (approx - q @ c.T).abs()
    assert (error <= bound + 1e-5).all()
    assert error.max() > 0


def test_shortlist_dtype_is_checked():
    with pytest.raises(ValueError, match="shortlist_dtype"):
        FunnelIndex(random_unit(10, 8, 22), [8], shortlist_dtype=torch.int32)


def test_a_document_with_the_query_id_is_not_a_result():
    data = RetrievalSet(["x"], ["query"], ["x", "y"], ["query", "other"], {"x": {"y": 1}})
    results = evaluate_retrieval(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]]), data, [2])
    assert results[2]["mrr@10"] == 100.0  # "y" is first once the query's own copy is skipped


def test_flops_count_only_the_survivors():
    index = FunnelIndex(random_unit(50, 16, 13), [8, 16])
    assert index.flops_per_query([(8, 10), (16, 40)]) == 2 * (50 * 8 + 10 * 16)


@pytest.mark.parametrize("k", [1, 10, 60, 500])  # 500: groups of 4
def test_grouped_top_k_is_exact(k):
    """Chunks wide enough for the grouped selection (see _chunk_top_k) give the same top k as a full sort,
    also with ties and with the best scores packed into one group."""
    q, c = random_unit(5, 16, 14), random_unit(20_000, 16, 15)
    c[100:132] = c[7]  # ties in a run of columns
    c[torch.arange(32) * 256 + 9] = c[7].clone()  # and one whole group (columns 9, 9 + 8192/32, ... of the first chunk)
    scores, index = top_k(q, c, k, chunk_size=8192)
    full_scores, _ = (q @ c.T).topk(k, dim=1)
    torch.testing.assert_close(scores, full_scores)
    torch.testing.assert_close(torch.einsum("qd,qkd->qk", q, c[index]), full_scores)


def test_grouped_top_k_above_a_floor_keeps_every_column_above_it():
    """With a running search's floor, only groups whose maximum is above it are searched, but all of their
    columns above the floor come back: here one group holds all 32 of them."""
    scores = torch.randn(2, 8192, generator=torch.Generator().manual_seed(23)) * 0.1
    strong = 5 + 256 * torch.arange(32)  # group 5 of 8192 / 32 = 256 groups
    scores[0, strong] = 1 + 0.01 * torch.arange(32.0)
    floor = torch.full((2, 1), 0.9)
    kept_scores, kept = _chunk_top_k(scores, 40, floor)
    assert set(strong.tolist()) <= set(kept[0].tolist())
    assert torch.equal(scores.gather(1, kept), kept_scores)
    assert set(_chunk_top_k(scores, 40)[1][1].tolist()) == set(scores[1].topk(40).indices.tolist())  # no floor
