"""Retrieval with nested embeddings, one job per file:

    data.py      RetrievalSet: queries, corpus, qrels (load_beir, nli_retrieval_set)
    metrics.py   nDCG / MRR / recall, and evaluate_retrieval: exact search at every dim
    exact.py     prefix, top_k (exact chunked search), rerank
    quantize.py  int8 and binary storage, quantized_search
    funnel.py    FunnelIndex: shortlist with a few dims, re-score with more
    ivf.py       IVFIndex: an inverted-file first stage for large corpora
"""

from mrl.retrieval.data import RetrievalSet, load_beir, nli_retrieval_set
from mrl.retrieval.funnel import FunnelIndex
from mrl.retrieval.ivf import IVFIndex
from mrl.retrieval.metrics import METRICS, evaluate_retrieval, retrieval_metrics

__all__ = ["RetrievalSet", "load_beir", "nli_retrieval_set", "FunnelIndex", "IVFIndex", "METRICS",
           "evaluate_retrieval", "retrieval_metrics"]
