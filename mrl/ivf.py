"""Inverted-file (IVF) search: the corpus split into lists by spherical k-means; a query scores only the
documents of the n_probe lists whose centroids are nearest to it.

Why a funnel wants it: an exact first stage scores and selects from every document, so on a large corpus its
cost is N·d₁ however small d₁ is, plus a pass over N scores. An IVF first stage scores about
N·n_probe/n_lists documents (plus the n_lists centroids). The MRL paper's adaptive retrieval shortlists with
an approximate index (HNSW) for the same reason. The price is recall: a document in a list that was not
probed is missed; n_probe = n_lists is exact search.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .retrieval import _chunk_top_k, int8_scales, quantize_int8, quantize_int8_queries


def nearest_centroid(x: Tensor, centroids: Tensor, chunk_size: int = 65_536) -> Tensor:
    """For each row of x, the index of the centroid with the largest inner product (chunked over x)."""
    return torch.cat([(x[i:i + chunk_size] @ centroids.T).argmax(1) for i in range(0, len(x), chunk_size)])


def spherical_kmeans(x: Tensor, n_clusters: int, iterations: int = 10, seed: int = 0) -> Tensor:
    """(n_clusters, d) unit centroids for unit rows x (Lloyd's algorithm on the sphere): start from n_clusters
    distinct random rows; then `iterations` times, assign each row to its nearest centroid (largest inner
    product) and move each centroid to the normalised mean of its rows (a cluster left empty keeps its centroid)."""
    if not 0 < n_clusters <= len(x):
        raise ValueError(f"n_clusters: expected 1..{len(x)} (the number of rows), got {n_clusters}")
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=generator)[:n_clusters].to(x.device)].clone()
    for _ in range(iterations):
        assignment = nearest_centroid(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=n_clusters)
        centroids = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), centroids)
    return centroids


class IVFIndex:
    """A corpus (N, d) of unit vectors, regrouped by list: list l is columns offsets[l]:offsets[l+1] of
    vectors_t (d, N; the transpose, so a list's scores are one matmul with no copy), and
    ids[offsets[l]:offsets[l+1]] are those vectors' rows in the corpus.

    The n_clusters centroids are trained on a sample of `sample_per_cluster` rows per cluster (k-means on all of
    a 1M corpus buys nothing), then every row joins the cluster of its nearest centroid. k-means clusters are
    uneven (a few hold several times the mean), and a search pads every list to the longest, so a cluster of
    more than `max_list_size` rows (default: the mean, N / n_clusters) is split into near-equal lists that
    share its centroid; a query that probes one of them probes the others too (same score), unless n_probe
    cuts between them.

    dtype: the vectors as stored and scored. torch.int8: codes with per-dim scales calibrated on the corpus
    (quantize_int8), queries as int8 codes of q·scales (quantize_int8_queries), int8 × int8 -> int32 matmuls;
    search then returns the int32 code scores (a funnel re-scores its survivors in float32). Measured on CPU
    only; on CUDA, torch._int_mm wants more than 16 rows, which a list probed by few queries does not have.
    The last search's score table is kept for the next one (a fresh one each time costs page faults).
    """

    def __init__(self, corpus: Tensor, n_clusters: int, dtype: torch.dtype = torch.float32, iterations: int = 10,
                 sample_per_cluster: int = 256, max_list_size: int | None = None, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randperm(len(corpus), generator=generator)[:n_clusters * sample_per_cluster]
        centroids = spherical_kmeans(corpus[sample.to(corpus.device)], n_clusters, iterations, seed)
        assignment = nearest_centroid(corpus, centroids)
        self.ids = assignment.argsort(stable=True)
        if dtype == torch.int8:
            self.scales = int8_scales(corpus)
            self.vectors_t = quantize_int8(corpus[self.ids], self.scales).T.contiguous()
        else:
            self.scales, self.vectors_t = None, corpus[self.ids].T.to(dtype).contiguous()
        # the clusters, cut into lists of at most max_list_size rows (an empty cluster gives no list)
        max_list_size = max_list_size or math.ceil(len(corpus) / n_clusters)
        cluster_sizes = torch.bincount(assignment, minlength=n_clusters)
        n_parts = (cluster_sizes + max_list_size - 1) // max_list_size
        cluster = torch.repeat_interleave(torch.arange(n_clusters, device=corpus.device), n_parts)  # per list
        part = torch.arange(len(cluster), device=corpus.device) - (n_parts.cumsum(0) - n_parts)[cluster]
        self.sizes = (cluster_sizes[cluster] // n_parts[cluster]
                      + (part < cluster_sizes[cluster] % n_parts[cluster]).long())
        self.centroids = centroids[cluster]
        self.offsets = [0] + self.sizes.cumsum(0).tolist()
        self._table = None

    @property
    def n_lists(self) -> int:
        return len(self.centroids)

    def probe(self, queries: Tensor, n_probe: int) -> Tensor:
        """(Q, n_probe): the lists each query searches, those of its nearest centroids."""
        if not 0 < n_probe <= self.n_lists:
            raise ValueError(f"n_probe: expected 1..{self.n_lists} (the number of lists), got {n_probe}")
        return (queries.float() @ self.centroids.T).topk(n_probe, dim=1).indices

    def scanned(self, queries: Tensor, n_probe: int) -> float:
        """Mean number of vectors each query scores: the centroids plus the documents of its probed lists."""
        return self.n_lists + self.sizes[self.probe(queries, n_probe)].sum(1).float().mean().item()

    def search(self, queries: Tensor, k: int, n_probe: int, table_size: int = 1 << 27) -> tuple[Tensor, Tensor]:
        """(Q, k) scores and corpus indices, best first, among the documents of each query's probed lists. Where
        those lists hold fewer than k documents, the places left over have the lowest score and index -1.

        One matmul per list, with all the queries that probe it. A (queries, n_probe, L) table (L: the longest
        list) holds each query's scores, list by list, the unused places at the lowest score; one exact top-k
        over each query's row of it picks the best k. Queries go in chunks whose table holds at most
        `table_size` scores (512 MB of float32 by default).
        """
        k = min(k, len(self.ids))
        longest = max(int(self.sizes.max()), -(-k // n_probe))  # (a row holds at least k places)
        longest += -(n_probe * longest) % 128  # a row width that the grouped top-k can split into groups
        query_chunk = max(1, table_size // (n_probe * longest))
        results = [self._search(queries[i:i + query_chunk], k, n_probe, longest)
                   for i in range(0, len(queries), query_chunk)]
        return torch.cat([s for s, _ in results]), torch.cat([i for _, i in results])

    def _search(self, queries: Tensor, k: int, n_probe: int, longest: int) -> tuple[Tensor, Tensor]:
        n_queries = len(queries)
        probed = self.probe(queries, n_probe).flatten()  # (Q·P,): pair p is query p // P, its slot p % P
        if self.scales is not None:  # int8 codes, int32 scores
            codes, matmul, score_dtype = quantize_int8_queries(queries, self.scales), torch._int_mm, torch.int32
            lowest = torch.iinfo(torch.int32).min
        else:
            score_dtype = self.vectors_t.dtype
            codes, matmul, lowest = queries.to(score_dtype), torch.matmul, -math.inf
        table = self._score_table(n_queries * n_probe * longest, score_dtype)
        table = table.view(n_queries * n_probe, longest).fill_(lowest)
        pairs_by_list, start = probed.argsort(), 0
        for lst, n_pairs in enumerate(torch.bincount(probed, minlength=self.n_lists).tolist()):
            pairs, start = pairs_by_list[start:start + n_pairs], start + n_pairs
            lo, hi = self.offsets[lst], self.offsets[lst + 1]
            if n_pairs:
                table[pairs, :hi - lo] = matmul(codes[pairs // n_probe], self.vectors_t[:, lo:hi])
        best_scores, column = _chunk_top_k(table.view(n_queries, n_probe * longest), k)
        best_scores, order = best_scores.sort(dim=1, descending=True)
        column = column.gather(1, order)  # = slot · L + place in the slot's list
        lst = probed.view(n_queries, n_probe).gather(1, column // longest)
        offsets = torch.tensor(self.offsets[:-1], device=queries.device)
        place = (offsets[lst] + column % longest).clamp_max(len(self.ids) - 1)  # (padding: any valid row)
        return best_scores, self.ids[place].masked_fill(best_scores == lowest, -1)

    def _score_table(self, size: int, dtype: torch.dtype) -> Tensor:
        if self._table is None or self._table.numel() < size or self._table.dtype != dtype:
            self._table = torch.empty(size, dtype=dtype, device=self.vectors_t.device)
        return self._table[:size]
