"""Exact search over a prefix of the embeddings: top-k by inner product, chunked so a 1M × 768 corpus fits,
and re-scoring of candidates (a funnel's later stages: mrl.retrieval.funnel).

Embeddings here are float tensors at full width; a dim d means the first d columns, re-normalised, exactly as
in training (mrl.loss.matryoshka).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def prefix(x: Tensor, d: int) -> Tensor:
    """The first d dims, re-normalised (contiguous, so a search over it reads d floats per vector)."""
    return F.normalize(x[:, :d].float(), dim=-1).contiguous()


def top_k(queries: Tensor, corpus: Tensor, k: int, chunk_size: int = 65_536) -> tuple[Tensor, Tensor]:
    """Exact maximum inner product search: (Q, k) scores and corpus indices, best first.

    The corpus is scanned in chunks of `chunk_size` rows into one reused (Q, chunk) score buffer (no fresh
    allocation per chunk), keeping a running top k, so memory stays at Q × chunk_size scores however large
    the corpus (1M × 768 fits). Scores are computed in the dtype of the inputs; int8 codes (see
    quantize_int8_queries) give exact int32 dot products of the codes.
    """
    k = min(k, len(corpus))
    matmul = torch._int_mm if queries.dtype == torch.int8 else torch.matmul  # int8 × int8 -> int32, exact
    buffer = torch.empty(len(queries), min(chunk_size, len(corpus)), device=queries.device,
                         dtype=torch.int32 if queries.dtype == torch.int8 else queries.dtype)
    best_scores = buffer.new_empty(len(queries), 0)
    best_index = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)
    for start in range(0, len(corpus), chunk_size):
        block = corpus[start:start + chunk_size]
        # a whole buffer for full chunks (_int_mm writes only into a contiguous output), a fresh one for the last
        scores = matmul(queries, block.T, out=buffer) if len(block) == buffer.shape[1] else matmul(queries, block.T)
        floor = best_scores[:, -1:] if best_scores.shape[1] == k else None  # k-th best so far (kept sorted)
        chunk_scores, chunk_index = _chunk_top_k(scores, min(k, len(block)), floor)
        merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
        merged_index = torch.cat([best_index, chunk_index + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_index = merged_index.gather(1, order)
    return best_scores, best_index


def _chunk_top_k(scores: Tensor, k: int, floor: Tensor | None = None, group: int = 32) -> tuple[Tensor, Tensor]:
    """The top k of each row (unsorted), through groups. The columns are dealt into groups of `group` (halved,
    down to 4, while k·group·4 > W; group j holds columns j, j + W/group, j + 2W/group, ...); the k' groups
    with the largest maxima are kept, and the top min(k, k'·group) is taken among their members only. k' = k;
    given each row's floor (Q, 1), k' = the most groups any row has with a maximum above its floor.

    Exact: a column among the top k has a score >= s_k (the k-th best), so its group's maximum is >= s_k; at
    most k groups reach s_k (each holds one of the k columns that do), and all of them are among the k groups
    with the largest maxima. With a floor (the k-th best of a running search), only columns above it can enter
    the running top k; each lies in a group whose maximum is above the floor, and its row's k' best groups
    include all such groups. The group maxima are one elementwise max over `group` contiguous slices of the
    row (cheaper than a reduction over short runs); the costly selection then runs over k'·group columns
    instead of the whole chunk, and k' shrinks as the floor rises.
    """
    n_rows, width = scores.shape
    while group > 4 and (k * group * 4 > width or width % group):  # smaller groups for a large k
        group //= 2
    if k * group * 4 > width or width % group:  # too few groups to pay off: plain top-k
        return scores.topk(k, dim=1, sorted=False)
    n_groups = width // group
    group_max = scores.view(n_rows, group, n_groups).amax(dim=1)  # (Q, n_groups)
    n_best_groups = k if floor is None else max(1, min(k, int((group_max > floor).sum(1).max())))
    groups = group_max.topk(n_best_groups, dim=1, sorted=False).indices  # (Q, k')
    members = (groups.unsqueeze(-1) + n_groups * torch.arange(group, device=scores.device)).flatten(1)  # (Q, k'·group)
    member_scores, position = scores.gather(1, members).topk(min(k, members.shape[1]), dim=1, sorted=False)
    return member_scores, members.gather(1, position)


def rerank(queries: Tensor, corpus: Tensor, candidates: Tensor, k: int, query_chunk: int = 256
           ) -> tuple[Tensor, Tensor]:
    """Score only the (Q, n) candidate rows of corpus for each query and keep the best k: (Q, k), (Q, k).
    A candidate -1 (none: an approximate first stage that found fewer than n) scores -inf. Queries go
    `query_chunk` at a time, so the gathered candidates take query_chunk × n × d floats at most."""
    scores = torch.cat([torch.einsum("qd,qnd->qn", queries[i:i + query_chunk], corpus[candidates[i:i + query_chunk]])
                        for i in range(0, len(queries), query_chunk)])  # (Q, n)
    scores = scores.masked_fill(candidates < 0, float("-inf"))
    best_scores, order = scores.topk(min(k, scores.shape[1]), dim=1)
    return best_scores, candidates.gather(1, order)
