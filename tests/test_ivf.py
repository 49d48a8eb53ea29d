"""Inverted-file search against brute force: exact when every list is probed, and otherwise exactly the best
of the probed lists; k-means; lists that partition the corpus; the funnel with an IVF first stage."""

import pytest
import torch

from mrl.retrieval.exact import prefix, top_k
from mrl.retrieval.funnel import FunnelIndex
from mrl.retrieval.ivf import IVFIndex, nearest_centroid, spherical_kmeans
from mrl.retrieval.quantize import corpus_scales, quantize_codes, quantize_int8_queries


def random_unit(n, d, seed):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def mean_cosine_to_nearest(x, centroids):
    return (x @ centroids.T).amax(1).mean().item()


def test_kmeans_improves_on_its_start_and_converges():
    x = random_unit(600, 8, 0)
    start = spherical_kmeans(x, 12, iterations=0)
    assert torch.equal(start, spherical_kmeans(x, 12, iterations=0))  # the seed fixes the start
    assert len(torch.unique(start, dim=0)) == 12  # distinct rows
    trained = spherical_kmeans(x, 12, iterations=50)
    torch.testing.assert_close(trained.norm(dim=1), torch.ones(12))
    assert mean_cosine_to_nearest(x, trained) > mean_cosine_to_nearest(x, start) + 0.05
    # converged: each centroid is the normalised mean of the rows nearest to it
    assignment = nearest_centroid(x, trained)
    means = torch.zeros_like(trained).index_add_(0, assignment, x)
    torch.testing.assert_close(torch.nn.functional.normalize(means, dim=-1), trained, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="n_clusters"):
        spherical_kmeans(x, 601)


def list_of_each_row(ivf, n):
    """(n,): the list that holds each corpus row."""
    lists = torch.empty(n, dtype=torch.long)
    lists[ivf.ids] = torch.repeat_interleave(torch.arange(ivf.n_lists), ivf.sizes)
    return lists


def test_lists_partition_the_corpus_and_respect_the_size_cap():
    corpus = random_unit(1000, 16, 1)
    ivf = IVFIndex(corpus, 10, max_list_size=40)
    assert torch.equal(ivf.ids.sort().values, torch.arange(1000))  # every row in exactly one list
    assert int(ivf.sizes.sum()) == 1000 and int(ivf.sizes.max()) <= 40 and ivf.n_lists >= 25
    assert ivf.offsets[-1] == 1000 and int(ivf.sizes.min()) > 0
    torch.testing.assert_close(ivf.vectors_t.T, corpus[ivf.ids])
    # every row's list belongs to the cluster whose centroid is nearest to the row
    nearest = (corpus @ ivf.centroids.T).argmax(1)
    assert torch.equal(ivf.cluster_of_list[list_of_each_row(ivf, 1000)], nearest)
    # a cluster's lists are consecutive and listed in lists_of_cluster, -1 after them
    for cluster, lists in enumerate(ivf.lists_of_cluster.tolist()):
        mine = [l for l in lists if l >= 0]
        assert mine == (ivf.cluster_of_list == cluster).nonzero().flatten().tolist()
        assert lists == mine + [-1] * (len(lists) - len(mine))


def test_probe_takes_whole_clusters_nearest_first():
    corpus, queries = random_unit(3000, 32, 14), random_unit(9, 32, 15)
    ivf = IVFIndex(corpus, 12, max_list_size=100)  # clusters of 2-4 lists
    cluster_order = (queries @ ivf.centroids.T).argsort(dim=1, descending=True)
    for n_probe in (1, 3, 7, ivf.n_lists):
        probed = ivf.probe(queries, n_probe)
        for q in range(9):
            expected = [l for c in cluster_order[q].tolist() for l in ivf.lists_of_cluster[c].tolist() if l >= 0]
            assert probed[q].tolist() == expected[:n_probe]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_search_returns_the_best_of_the_probed_lists(dtype):
    """The same index searched with several k and n_probe (the score table reused), in query chunks or not:
    always the exact best of the probed lists, scored in the index's dtype."""
    corpus, queries = random_unit(3000, 32, 4), random_unit(9, 32, 5)
    ivf = IVFIndex(corpus, 20, dtype=dtype)
    scores_all = (queries.to(dtype) @ corpus.to(dtype).T).float()
    list_of_row = list_of_each_row(ivf, 3000)
    for k, n_probe, table_size in ((15, 3, 1 << 27), (40, 7, 1 << 27), (15, 3, 1000), (5000, 2, 1 << 27)):
        probed = ivf.probe(queries, n_probe)
        allowed = (list_of_row[None, :, None] == probed[:, None, :]).any(-1)  # (Q, N): row in a probed list
        expected = scores_all.masked_fill(~allowed, float("-inf")).topk(min(k, 3000), dim=1).values
        scores, index = ivf.search(queries, k, n_probe, table_size=table_size)
        assert scores.shape == index.shape == (9, min(k, 3000))
        torch.testing.assert_close(scores.float(), expected)
        found = index >= 0
        assert torch.equal(found, torch.isfinite(expected))  # -1 exactly where the probed lists ran out
        assert allowed.gather(1, index.clamp_min(0))[found].all()
        torch.testing.assert_close(scores_all.gather(1, index.clamp_min(0))[found], scores.float()[found])
        assert len(set(index[0][found[0]].tolist())) == int(found[0].sum())  # no document twice
    best_scores, _ = ivf.search(queries, 15, 3)
    assert (best_scores[:, 0].float() < scores_all.amax(1)).any()  # some queries' best lies in lists not probed


def test_a_query_gets_the_same_results_alone_as_in_a_batch():
    corpus, queries = random_unit(3000, 32, 2), random_unit(37, 32, 3)
    ivf = IVFIndex(corpus, 20)  # 20 clusters cut into ~30 lists: n_probe can end inside a cluster
    for n_probe in (4, 7):
        _, batch = ivf.search(queries, 100, n_probe)
        for q in range(37):
            assert torch.equal(ivf.search(queries[q:q + 1], 100, n_probe)[1], batch[q:q + 1])


def test_probing_every_list_is_exact_search():
    corpus, queries = random_unit(3000, 32, 2), random_unit(9, 32, 3)
    ivf = IVFIndex(corpus, 20)
    scores, index = ivf.search(queries, 15, n_probe=ivf.n_lists)
    exact_scores, exact_index = top_k(queries, corpus, 15)
    torch.testing.assert_close(scores, exact_scores)
    assert torch.equal(index, exact_index)


def test_int8_lists_score_the_codes_exactly():
    corpus, queries = random_unit(2000, 32, 6), random_unit(7, 32, 7)
    ivf = IVFIndex(corpus, 16, dtype=torch.int8)
    scales = corpus_scales(corpus)
    codes, query_codes = quantize_codes(corpus, scales), quantize_int8_queries(queries, scales)
    scores, index = ivf.search(queries, 20, n_probe=ivf.n_lists)
    assert scores.dtype == torch.int32
    code_scores = query_codes.long() @ codes.long().T  # int64: no overflow, exact
    assert torch.equal(scores.long(), code_scores.topk(20, dim=1).values)  # the exact top-20 code scores...
    assert torch.equal(scores.long(), code_scores.gather(1, index))  # ...and the documents that have them


def test_fewer_documents_than_k_leaves_minus_one():
    corpus, queries = random_unit(200, 16, 8), random_unit(4, 16, 9)
    ivf = IVFIndex(corpus, 8)
    scores, index = ivf.search(queries, 150, n_probe=1)
    found = ivf.sizes[ivf.probe(queries, 1)[:, 0]]
    for row, n in enumerate(found.tolist()):
        assert (index[row, :n] >= 0).all() and (index[row, n:] == -1).all()
        assert torch.isinf(scores[row, n:]).all() and torch.isfinite(scores[row, :n]).all()
    funnel = FunnelIndex(corpus, [8, 16], ivf_clusters=8)
    scores, index = funnel.search(queries, [(8, 150), (16, 100)], n_probe=1)  # a re-scored -1 stays last
    assert ((index == -1) == torch.isinf(scores)).all() and (index[:, 0] >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_funnel_with_an_ivf_probing_everything_equals_exact_search(dtype):
    corpus, queries = random_unit(2000, 64, 10), random_unit(6, 64, 11)
    stages = [(16, 2000), (64, 10)]  # the first stage keeps everything; float32 decides
    funnel = FunnelIndex(corpus, [16, 64], shortlist_dtype=dtype, ivf_clusters=12)
    n_lists = funnel.first_stage(16).n_lists
    _, index = funnel.search(queries, stages, n_probe=n_lists)
    assert torch.equal(index, top_k(prefix(queries, 64), prefix(corpus, 64), 10)[1])
    scanned = funnel.first_stage(16).scanned(prefix(queries, 16), n_lists)
    assert scanned == len(funnel.first_stage(16).centroids) + 2000  # the centroids, then every document
    assert funnel.flops_per_query(stages, scanned) == 2 * (scanned * 16 + 2000 * 64)


def test_probe_arguments_are_checked():
    corpus, queries = random_unit(100, 8, 12), random_unit(2, 8, 13)
    with pytest.raises(ValueError, match="n_probe"):
        FunnelIndex(corpus, [8]).search(queries, [(8, 5)], n_probe=2)  # no IVF to probe
    with pytest.raises(ValueError, match="n_probe"):
        FunnelIndex(corpus, [8], ivf_clusters=4).search(queries, [(8, 5)])  # IVF without n_probe
    with pytest.raises(ValueError, match="n_probe"):
        IVFIndex(corpus, 4).search(queries, 5, n_probe=10_000)
    with pytest.raises(ValueError, match="n_probe"):
        FunnelIndex(corpus, [8], ivf_clusters=4).search(queries, [(8, 5)], n_probe=0)
    with pytest.raises(ValueError, match="ivf_clusters"):
        FunnelIndex(corpus, [8], ivf_clusters=-1)
