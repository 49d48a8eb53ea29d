"""Retrieval metrics on hand-computed cases, exact / funnel / quantised search against plain float search."""

import json
import math

import pytest
import torch

from conftest import SHARED
from mrl.retrieval import (FunnelIndex, RetrievalSet, evaluate_retrieval, int8_scales, load_beir, mrr_at_k,
                           ndcg_at_k, nli_retrieval_set, prefix, quantize_binary, quantize_int8, quantized_search,
                           recall_at_k, retrieval_metrics, storage_bytes, top_k, unpack_signs)


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
    scales = int8_scales(c)
    codes = quantize_int8(c, scales)
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


def test_bf16_shortlist_keeps_the_float32_order_of_its_survivors():
    q, c = random_unit(6, 64, 11), random_unit(400, 64, 12)
    exact_scores, exact = top_k(prefix(q, 64), prefix(c, 64), 10)
    scores, index = FunnelIndex(c, [16, 64], shortlist_dtype=torch.bfloat16).search(q, [(16, 400), (64, 10)])
    assert torch.equal(index, exact)  # the shortlist keeps everything: only float32 decides
    assert scores.dtype == torch.float32


def test_a_document_with_the_query_id_is_not_a_result():
    data = RetrievalSet(["x"], ["query"], ["x", "y"], ["query", "other"], {"x": {"y": 1}})
    results = evaluate_retrieval(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]]), data, [2])
    assert results[2]["mrr@10"] == 100.0  # "y" is first once the query's own copy is skipped


def test_flops_count_only_the_survivors():
    index = FunnelIndex(random_unit(50, 16, 13), [8, 16])
    assert index.flops_per_query([(8, 10), (16, 40)]) == 2 * (50 * 8 + 10 * 16)


@pytest.mark.parametrize("k", [1, 10, 60])
def test_grouped_top_k_is_exact(k):
    """Chunks wide enough for the grouped selection (see _chunk_top_k) give the same top k as a full sort,
    also with ties and with the best scores packed into one group."""
    q, c = random_unit(5, 16, 14), random_unit(20_000, 16, 15)
    c[100:132] = c[7]  # one group full of the same strong document for some queries: ties across a group
    scores, index = top_k(q, c, k, chunk_size=8192)
    full_scores, _ = (q @ c.T).topk(k, dim=1)
    torch.testing.assert_close(scores, full_scores)
    torch.testing.assert_close(torch.einsum("qd,qkd->qk", q, c[index]), full_scores)
