"""Scores at every dim × precision (float32, int8, int4, binary): how much of each prefix survives quantisation.

    quantization_table  retrieval: nDCG@10, Recall@10 and Recall@100 per dim × precision, with and without float
                        rescoring (mrl.retrieval.quantize.quantized_search), its Markdown, and its rows by storage

Each dim's prefix is calibrated on its own corpus (int8 / int4 per-dim scales), as mrl.retrieval.quantize does.
STS at each precision is mrl.eval.sts.evaluate_sts_stored; a table's retention (% of float32 at the full dim),
mrl.eval.report.retention.
"""

from mrl.retrieval.metrics import rankings_from, retrieval_metrics
from mrl.retrieval.quantize import PRECISIONS, quantized_search, storage_bytes

RESCORE = 4  # float rescoring re-scores the best RESCORE·k of the quantised search


def quantization_table(queries, docs, data, dims, k: int = 100) -> list[dict]:
    """A row per dim × storage: float32, then each of int8, int4 and binary alone and with the float rescoring of
    its best RESCORE·k; bytes per vector, nDCG@10, Recall@10 and Recall@100 (×100) of the top k. (A document with
    the query's own id, in a BEIR set that holds its queries, is skipped from those k, as rankings_from does.)"""
    rows = []
    for d in dims:
        for kind in PRECISIONS:
            for rescore in (0,) if kind == "float32" else (0, RESCORE):
                _, index = quantized_search(queries, docs, d, kind, k=k, rescore=rescore)
                metrics = retrieval_metrics(rankings_from(index, data), data.qrels)
                rows.append({"dim": d, "storage": kind + (f" + float rescoring of top {rescore}×{k}" if rescore else ""),
                             "precision": kind, "rescored": bool(rescore), "bytes": storage_bytes(kind, d),
                             **{m: metrics[m] for m in ("ndcg@10", "recall@10", "recall@100")}})
    return rows


def quantization_markdown(rows: list[dict]) -> str:
    lines = ["| dim | storage | bytes/vector | nDCG@10 | Recall@10 | Recall@100 |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {q['dim']} | {q['storage']} | {q['bytes']} | {q['ndcg@10']:.2f} | {q['recall@10']:.2f} | "
              f"{q['recall@100']:.2f} |" for q in rows]
    return "\n".join(lines)


def by_storage(rows: list[dict], metric: str = "ndcg@10") -> dict[str, dict[int, float]]:
    """quantization_table's rows as {storage: {dim: metric}}, the shape retention and markdown_table take."""
    table: dict[str, dict[int, float]] = {}
    for row in rows:
        name = row["precision"] + (", rescored" if row["rescored"] else "")
        table.setdefault(name, {})[row["dim"]] = row[metric]
    return table
