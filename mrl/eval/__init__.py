"""Evaluation: per-dim STS Spearman, the result tables and model card, and the evaluation commands.

    sts.py        Spearman of cosine against gold scores at every prefix dim, float or stored in int8 / int4 / binary
    report.py     markdown tables of results (and of retention: % of float32 at the full dim), the model card a
                  saved model carries, and its MTEB section
    precision.py  retrieval at every dim × precision (float32, int8, int4, binary), with and without rescoring
    evaluate.py   python -m mrl.eval: STS and retrieval at every dim (and precision) for saved models
    mteb.py       python -m mrl.mteb: MTEB tasks at every dim × precision (mteb: an optional extra)
    mteb_local.py MTEB tasks from local files (an STS table, a retrieval set), for running offline
"""

from mrl.eval.report import markdown_table
from mrl.eval.sts import evaluate_sts, sts_spearman_by_dim

__all__ = ["evaluate_sts", "sts_spearman_by_dim", "markdown_table"]
