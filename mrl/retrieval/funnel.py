"""Funnel (adaptive) retrieval: shortlist with a few dims, re-score the survivors with more, up to full width.

A Matryoshka embedding's first d dims are themselves an embedding, so a search can look at the whole corpus
through a narrow prefix and spend full-width work only on a shortlist. The first stage is exact search over
the d₁-dim prefix (mrl.retrieval.exact.top_k) or, for a large corpus, an inverted-file search
(mrl.retrieval.ivf) that scores only the lists near each query; every later stage re-scores the survivors of
the one before, in float32.
"""

import torch
from torch import Tensor

from mrl.retrieval.exact import prefix, rerank, top_k
from mrl.retrieval.ivf import IVFIndex
from mrl.retrieval.quantize import corpus_scales, quantize_codes, quantize_int8_queries


class FunnelIndex:
    """A corpus kept as re-normalised prefixes, one contiguous matrix per dim of the funnel's stages.

    search(queries, stages=[(48, 1000), (256, 100), (768, 10)]): search with the first 48 dims keeps 1000
    candidates per query, re-scored with 256 dims to keep 100, re-scored with 768 dims to keep 10. Cost per
    query: N·d₁ + Σ_i keep_{i-1}·d_i multiply-adds, instead of N·D for exact full-width search.

    shortlist_dtype: the first stage's prefix matrix and scores in this dtype; later stages, which decide the
    final order, score in float32. torch.bfloat16: half the memory, and a matmul several times faster where
    the CPU or GPU has bf16 units. torch.int8: a quarter of the memory; the corpus prefix as int8 codes with
    per-dim scales calibrated on it (quantize_codes), each query as int8 codes of q·scales
    (quantize_int8_queries), scored by int8 × int8 -> int32 matmuls (VNNI on x86 CPUs, int8 tensor cores on
    GPUs). A one-stage search returns those int32 code scores. Measured on CPU only; torch._int_mm on CUDA
    has shape rules of its own (more than 16 queries, dims divisible by 8), and int8 IVF lists are CPU only.

    ivf_clusters: 0 for an exact first stage; else the first stage is an IVFIndex over the d₁-dim prefix
    with this many k-means clusters (cut into lists of at most the mean cluster size), and search takes
    n_probe, the number of lists each query scans (approximate:
    documents in lists that are not probed are missed; the index is built on a stage's first search).
    """

    def __init__(self, corpus: Tensor, dims: list[int], shortlist_dtype: torch.dtype = torch.float32,
                 ivf_clusters: int = 0):
        if shortlist_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
            raise ValueError(f"shortlist_dtype: expected float32, bfloat16, float16 or int8, got {shortlist_dtype}")
        if ivf_clusters < 0:
            raise ValueError(f"ivf_clusters: expected 0 (exact first stage) or a number of clusters, got {ivf_clusters}")
        self.size, self.shortlist_dtype, self.ivf_clusters = len(corpus), shortlist_dtype, ivf_clusters
        self.prefixes = {d: prefix(corpus, d) for d in sorted(set(dims))}
        self.shortlist = {}  # dim -> first-stage index: (matrix in shortlist_dtype, int8 scales or None) or IVFIndex

    def first_stage(self, dim: int) -> tuple[Tensor, Tensor | None] | IVFIndex:
        """The first-stage index of `dim`, built on first use."""
        if dim not in self.shortlist:
            corpus = self.prefixes[dim]
            if self.ivf_clusters:
                self.shortlist[dim] = IVFIndex(corpus, self.ivf_clusters, dtype=self.shortlist_dtype)
            elif self.shortlist_dtype == torch.int8:
                scales = corpus_scales(corpus)
                self.shortlist[dim] = quantize_codes(corpus, scales), scales
            else:
                self.shortlist[dim] = corpus.to(self.shortlist_dtype), None
        return self.shortlist[dim]

    def search(self, queries: Tensor, stages: list[tuple[int, int]], n_probe: int | None = None
               ) -> tuple[Tensor, Tensor]:
        """(Q, k) scores and corpus indices of the last stage's k, best first. With an IVF first stage, a query
        whose probed lists held fewer than k documents gets index -1 in the places left over, with score -inf
        (the int32 minimum from a one-stage int8 search)."""
        if bool(self.ivf_clusters) != (n_probe is not None):
            raise ValueError(f"n_probe: expected a number of lists with an IVF first stage and None without one, "
                             f"got {n_probe} (ivf_clusters={self.ivf_clusters})")
        (dim, keep), later = stages[0], stages[1:]
        first = prefix(queries, dim)
        if self.ivf_clusters:
            scores, index = self.first_stage(dim).search(first, keep, n_probe)
        else:
            corpus, scales = self.first_stage(dim)
            first = quantize_int8_queries(first, scales) if scales is not None else first.to(self.shortlist_dtype)
            scores, index = top_k(first, corpus, keep)
        for dim, keep in later:
            scores, index = rerank(prefix(queries, dim), self.prefixes[dim], index, keep)
        return scores, index

    def flops_per_query(self, stages: list[tuple[int, int]], scanned: float | None = None) -> float:
        """Multiply-adds × 2 of the scoring (the top-k selections are not counted). scanned: the vectors the
        first stage scores per query (default: the whole corpus; an IVF stage: IVFIndex.scanned)."""
        survivors, cost = self.size if scanned is None else scanned, 0
        for dim, keep in stages:
            cost += survivors * dim  # every survivor of the stage before is scored with `dim` dims
            survivors = min(keep, survivors)
        return 2 * cost
