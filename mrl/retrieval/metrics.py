"""Retrieval metrics (nDCG@10, MRR@10, Recall@10/100, as BEIR and MTEB compute them) and the per-dim
evaluation: exact search with the first d dims of full-width embeddings, re-normalised, for each d, exactly
as the loss truncates (mrl.loss.matryoshka) and as STS evaluation does (mrl.eval.sts).
"""

import math

from torch import Tensor

from mrl.retrieval.data import RetrievalSet
from mrl.retrieval.exact import prefix, top_k

METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100")


def ndcg_at_k(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    """Σ_{i<k} g_i/log2(i+2), divided by the same sum for the ideal order of the judged grades (linear gains,
    as pytrec_eval, BEIR and MTEB compute it, so graded sets give comparable numbers)."""
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    """1 / rank of the first relevant document within the top k, else 0."""
    return next((1.0 / (i + 1) for i, d in enumerate(ranked[:k]) if relevant.get(d, 0) > 0), 0.0)


def recall_at_k(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    """Share of the relevant documents found in the top k."""
    positives = {d for d, g in relevant.items() if g > 0}
    return len(positives.intersection(ranked[:k])) / len(positives) if positives else 0.0


def retrieval_metrics(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """Mean nDCG@10, MRR@10, Recall@10 and Recall@100 (×100) over the queries of `rankings`."""
    per_query = [(ndcg_at_k(r, qrels[q]), mrr_at_k(r, qrels[q]), recall_at_k(r, qrels[q], 10),
                  recall_at_k(r, qrels[q], 100)) for q, r in rankings.items()]
    return {name: 100 * sum(v[i] for v in per_query) / len(per_query) for i, name in enumerate(METRICS)}


def rankings_from(index: Tensor, data: RetrievalSet) -> dict[str, list[str]]:
    """Search results -> ranked doc ids per query; a document with the query's own id is skipped (as BEIR does
    for sets whose queries are also in the corpus), and so is -1 (no document: see IVFIndex.search)."""
    return {q: [data.doc_ids[i] for i in row if i >= 0 and data.doc_ids[i] != q]
            for q, row in zip(data.query_ids, index.tolist())}


def evaluate_retrieval(query_embeddings: Tensor, doc_embeddings: Tensor, data: RetrievalSet, dims: list[int]
                       ) -> dict[int, dict[str, float]]:
    """{dim: {metric: value ×100}}: exact search with the first d dims of full-width embeddings, for each d."""
    results = {}
    for d in sorted(dims, reverse=True):
        _, index = top_k(prefix(query_embeddings, d), prefix(doc_embeddings, d), 101)  # 100 besides the query itself
        results[d] = retrieval_metrics(rankings_from(index, data), data.qrels)
    return results
