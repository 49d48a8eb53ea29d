"""Evaluation: per-dim STS Spearman, the result tables and model card, and the evaluation commands.

    sts.py        Spearman of cosine against gold scores at every prefix dim
    report.py     markdown tables of results, the model card a saved model carries, and its MTEB section
    evaluate.py   python -m mrl.eval: STS and retrieval at every dim (and precision) for saved models
    mteb.py       python -m mrl.mteb: MTEB tasks at every dim × precision (mteb: an optional extra)
    mteb_local.py MTEB tasks from local files (an STS table, a retrieval set), for running offline
"""

from mrl.eval.report import markdown_table
from mrl.eval.sts import evaluate_sts, sts_spearman_by_dim

__all__ = ["evaluate_sts", "sts_spearman_by_dim", "markdown_table"]
