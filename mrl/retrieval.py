"""Retrieval with nested embeddings: exact search at any dim, quantised search, and the metrics (funnel search:
mrl.funnel; inverted-file search: mrl.ivf).

Embeddings here are float tensors at full width; a dim d means the first d columns, re-normalised, exactly as
in training (mrl.matryoshka) and in STS evaluation (mrl.evaluation). Relevance judgements (qrels) are
{query_id: {doc_id: grade}}, as in BEIR (corpus.jsonl, queries.jsonl, qrels/<split>.tsv; see load_beir).
"""

import csv
import gzip
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100")


# --- data ----------------------------------------------------------------------------------------------------------

@dataclass
class RetrievalSet:
    """Queries, a corpus and qrels, with the ids in a fixed order (row i of an embedding matrix is ids[i])."""
    query_ids: list[str]
    queries: list[str]
    doc_ids: list[str]
    docs: list[str]
    qrels: dict[str, dict[str, int]]


def load_beir(folder: str, split: str = "test") -> RetrievalSet:
    """A BEIR folder: corpus.jsonl ({_id, title, text}), queries.jsonl ({_id, text}), qrels/<split>.tsv
    (query-id, corpus-id, score, with a header). Queries without a judgement are left out."""
    def read_jsonl(name):
        path = os.path.join(folder, name)
        opener = gzip.open if not os.path.exists(path) and os.path.exists(path + ".gz") else open
        with opener(path if opener is open else path + ".gz", "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    qrels: dict[str, dict[str, int]] = {}
    with open(os.path.join(folder, "qrels", f"{split}.tsv"), encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    corpus = read_jsonl("corpus.jsonl")
    queries = [q for q in read_jsonl("queries.jsonl") if q["_id"] in qrels]
    return RetrievalSet([q["_id"] for q in queries], [q["text"] for q in queries], [d["_id"] for d in corpus],
                        [(d.get("title", "") + " " + d["text"]).strip() for d in corpus], qrels)


def nli_retrieval_set(triplet_files: list[str], n_queries: int = 1000) -> RetrievalSet:
    """A retrieval test set from NLI triplets: the last `n_queries` distinct anchors (premises) of the files are
    the queries; the corpus is every distinct positive and negative hypothesis of all the files; a query's
    relevant documents are its entailments (its positives, grade 1). Contradictions of the same premise are
    in the corpus as hard distractors."""
    rows = []
    for path in triplet_files:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    docs = list(dict.fromkeys(t for r in rows for t in (r["positive"], r["negative"])))
    doc_id = {t: f"d{i}" for i, t in enumerate(docs)}
    entailments: dict[str, set[str]] = {}
    for r in rows:
        entailments.setdefault(r["anchor"], set()).add(doc_id[r["positive"]])
    anchors = list(entailments)[-n_queries:]
    query_ids = [f"q{i}" for i in range(len(anchors))]
    qrels = {q: {d: 1 for d in sorted(entailments[a])} for q, a in zip(query_ids, anchors)}
    return RetrievalSet(query_ids, anchors, [doc_id[t] for t in docs], docs, qrels)


# --- metrics -------------------------------------------------------------------------------------------------------

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


# --- search --------------------------------------------------------------------------------------------------------

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


# --- quantisation --------------------------------------------------------------------------------------------------

def int8_scales(corpus: Tensor) -> Tensor:
    """Per-dim scale s_c = max_i |x_ic| / 127, calibrated on the corpus (symmetric ranges)."""
    return corpus.abs().amax(0).clamp_min(1e-12) / 127


def quantize_int8(x: Tensor, scales: Tensor) -> Tensor:
    """x ≈ codes · scales, codes int8 in [-127, 127]: d bytes per vector (the scales are shared)."""
    return (x / scales).round().clamp(-127, 127).to(torch.int8)


def quantize_int8_queries(queries: Tensor, scales: Tensor) -> Tensor:
    """Query codes for int8 × int8 search against corpus codes X (x ≈ X·scales): q·x ≈ Σ_c (q_c·s_c)·X_c, so
    q·scales is quantised with a symmetric range of its own per query. That range multiplies all of a
    query's scores by one positive factor, so codes_q · Xᵀ ranks the corpus as q·x does, up to rounding."""
    weighted = queries * scales
    return (weighted / weighted.abs().amax(1, keepdim=True).clamp_min(1e-12) * 127).round().to(torch.int8)


def quantize_binary(x: Tensor) -> Tensor:
    """The sign of each dim, packed 8 per byte: ceil(d/8) bytes per vector. Bit 1 means x > 0."""
    bits = (x > 0).to(torch.uint8)
    bits = F.pad(bits, (0, (-bits.shape[1]) % 8))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=x.device)
    return (bits.view(len(x), -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_signs(packed: Tensor, d: int) -> Tensor:
    """Packed bits -> (n, d) ±1 float vectors; ±1 · ±1ᵀ = d − 2·Hamming distance."""
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :d].float() * 2 - 1


def storage_bytes(kind: str, d: int) -> int:
    return {"float32": 4 * d, "int8": d, "binary": math.ceil(d / 8)}[kind]


def quantized_search(queries: Tensor, corpus: Tensor, d: int, kind: str, k: int = 100, rescore: int = 0
                     ) -> tuple[Tensor, Tensor]:
    """Search the first d dims of a corpus stored as float32, int8 or binary codes.

    float32: exact cosine. int8: float queries against dequantised codes (asymmetric scoring). binary:
    Hamming similarity of the signs; with rescore=r, the best r·k by Hamming are re-scored with the float
    query against the float corpus vectors (kept off the search path, e.g. on disk) and the best k kept.
    """
    q, c = prefix(queries, d), prefix(corpus, d)
    if kind == "float32":
        return top_k(q, c, k)
    if kind == "int8":
        scales = int8_scales(c)
        return top_k(q, quantize_int8(c, scales).float() * scales, k)
    if kind == "binary":
        scores, index = top_k(unpack_signs(quantize_binary(q), d), unpack_signs(quantize_binary(c), d),
                              max(k, rescore * k))
        return rerank(q, c, index, k) if rescore else (scores[:, :k], index[:, :k])
    raise ValueError(f"kind: expected float32, int8 or binary, got {kind!r}")


# --- per-dim evaluation --------------------------------------------------------------------------------------------

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
