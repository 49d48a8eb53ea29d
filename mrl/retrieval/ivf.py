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

from mrl.retrieval.exact import _chunk_top_k
from mrl.retrieval.quantize import corpus_scales, quantize_codes, quantize_int8_queries


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

    Clusters and lists: n_clusters centroids are trained on a sample of `sample_per_cluster` rows per cluster
    (k-means on all of a 1M corpus buys nothing), and every row joins the cluster of its nearest centroid.
    k-means clusters are uneven (a few hold several times the mean) and a search pads every list to the
    longest, so each cluster is cut into near-equal lists of at most `max_list_size` rows (default: the mean
    cluster size, N / n_clusters). A query searches n_probe lists: those of its nearest clusters, nearest
    first, a cluster's lists together (the last cluster in part where n_probe ends inside it).

    dtype: the vectors as stored and scored. torch.int8 (CPU only: torch._int_mm on CUDA wants more than 16
    rows and widths divisible by 8, which lists do not have): codes with per-dim scales calibrated on the
    corpus (quantize_codes), queries as int8 codes of q·scales (quantize_int8_queries), int8 × int8 -> int32
    matmuls; search then returns the int32 code scores (a funnel re-scores its survivors in float32).

    Memory: a search's score table (see search) is kept on the index for the next one, as a fresh one costs
    page faults; one index is therefore not for searches from several threads at once.
    """

    def __init__(self, corpus: Tensor, n_clusters: int, dtype: torch.dtype = torch.float32, iterations: int = 10,
                 sample_per_cluster: int = 256, max_list_size: int | None = None, seed: int = 0):
        if dtype == torch.int8 and corpus.device.type != "cpu":
            raise ValueError(f"dtype: int8 lists are scored by torch._int_mm on the CPU only, got a corpus on "
                             f"{corpus.device} (use float32 or bfloat16 there)")
        corpus = corpus.float()  # k-means, centroids and int8 ranges in float32, whatever the corpus dtype
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randperm(len(corpus), generator=generator)[:n_clusters * sample_per_cluster]
        centroids = spherical_kmeans(corpus[sample.to(corpus.device)], n_clusters, iterations, seed)
        assignment = nearest_centroid(corpus, centroids)
        self.ids = assignment.argsort(stable=True)  # rows grouped by cluster, in cluster order
        if dtype == torch.int8:
            self.scales = corpus_scales(corpus)
            self.vectors_t = quantize_codes(corpus[self.ids], self.scales).T.contiguous()
        else:
            self.scales, self.vectors_t = None, corpus[self.ids].T.to(dtype).contiguous()
        # each cluster that holds rows, cut into lists of at most max_list_size rows
        cluster_sizes = torch.bincount(assignment, minlength=n_clusters)
        self.centroids, cluster_sizes = centroids[cluster_sizes > 0], cluster_sizes[cluster_sizes > 0]
        max_list_size = max_list_size or math.ceil(len(corpus) / n_clusters)
        n_parts = (cluster_sizes + max_list_size - 1) // max_list_size  # lists per cluster, >= 1
        first_list = n_parts.cumsum(0) - n_parts
        cluster = torch.repeat_interleave(torch.arange(len(n_parts), device=corpus.device), n_parts)  # per list
        part = torch.arange(len(cluster), device=corpus.device) - first_list[cluster]
        self.sizes = (cluster_sizes[cluster] // n_parts[cluster]
                      + (part < cluster_sizes[cluster] % n_parts[cluster]).long())  # near-equal parts
        self.cluster_of_list = cluster
        parts = torch.arange(int(n_parts.max()), device=corpus.device)
        self.lists_of_cluster = torch.where(parts < n_parts[:, None], first_list[:, None] + parts, -1)  # -1: none
        self.offsets = [0] + self.sizes.cumsum(0).tolist()
        self.list_starts = torch.tensor(self.offsets[:-1], device=corpus.device)
        self._table = None

    @property
    def n_lists(self) -> int:
        return len(self.sizes)

    def probe(self, queries: Tensor, n_probe: int) -> Tensor:
        """(Q, n_probe): the lists each query searches, those of its nearest clusters, nearest first."""
        self._check_n_probe(n_probe)
        clusters = (queries.float() @ self.centroids.T).topk(min(n_probe, len(self.centroids)), dim=1).indices
        lists = self.lists_of_cluster[clusters].flatten(1)  # (Q, clusters · most parts), -1 after a cluster's lists
        in_order = (lists < 0).int().argsort(dim=1, stable=True)[:, :n_probe]  # the first n_probe that exist
        return lists.gather(1, in_order)

    def scanned(self, queries: Tensor, n_probe: int) -> float:
        """Mean number of vectors each query scores: the centroids plus the documents of its probed lists."""
        return len(self.centroids) + self.sizes[self.probe(queries, n_probe)].sum(1).float().mean().item()

    def search(self, queries: Tensor, k: int, n_probe: int, table_size: int = 1 << 27) -> tuple[Tensor, Tensor]:
        """(Q, min(k, N)) scores and corpus indices, best first, among the documents of each query's probed
        lists. Where those lists hold fewer documents, the places left over have the lowest score (-inf, or
        the int32 minimum for int8) and index -1.

        One matmul per list, with all the queries that probe it. A (queries, n_probe, L) table (L: the longest
        list) holds each query's scores, list by list, the unused places at the lowest score; one exact top-k
        over each query's row of it picks the best k. Queries go in chunks whose table holds at most
        `table_size` scores (512 MB of float32 by default; one query's row, if it is larger).
        """
        self._check_n_probe(n_probe)
        k = min(k, len(self.ids))
        longest = max(int(self.sizes.max()), math.ceil(k / n_probe))  # (so that a query's row holds k places)
        longest += -longest % 32  # rows that the grouped top-k can split into groups of up to 32
        query_chunk = max(1, table_size // (n_probe * longest))
        results = [self._search(queries[i:i + query_chunk], k, n_probe, longest)
                   for i in range(0, max(len(queries), 1), query_chunk)]
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
        pairs_by_list = probed.argsort().split(torch.bincount(probed, minlength=self.n_lists).tolist())
        for list_id, pairs in enumerate(pairs_by_list):
            if len(pairs):
                lo, hi = self.offsets[list_id], self.offsets[list_id + 1]
                table[pairs, :hi - lo] = matmul(codes[pairs // n_probe], self.vectors_t[:, lo:hi])
        best_scores, column = _chunk_top_k(table.view(n_queries, n_probe * longest), k)
        best_scores, order = best_scores.sort(dim=1, descending=True)
        column = column.gather(1, order)  # = slot · L + place in the slot's list
        slot_list = probed.view(n_queries, n_probe).gather(1, column // longest)
        # a padding place lies past its list's end: clamped to some valid row here, it is marked -1 below
        row = (self.list_starts[slot_list] + column % longest).clamp_max(len(self.ids) - 1)
        return best_scores, self.ids[row].masked_fill(best_scores == lowest, -1)

    def _check_n_probe(self, n_probe: int):
        if not 0 < n_probe <= self.n_lists:
            raise ValueError(f"n_probe: expected 1..{self.n_lists} (the number of lists), got {n_probe}")

    def _score_table(self, size: int, dtype: torch.dtype) -> Tensor:
        """A flat buffer of `size` scores: the one kept from an earlier search where it is large enough."""
        if self._table is None or self._table.numel() < size or self._table.dtype != dtype:
            self._table = torch.empty(size, dtype=dtype, device=self.vectors_t.device)
        return self._table[:size]
