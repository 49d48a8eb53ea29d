"""Retrieval test sets: queries, a corpus and relevance judgements (qrels), from a BEIR folder or NLI triplets.

Qrels are {query_id: {doc_id: grade}}, as in BEIR (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
"""

import csv
import gzip
import json
import os
from dataclasses import dataclass


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
