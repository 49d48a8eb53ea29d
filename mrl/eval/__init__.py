"""Evaluation: per-dim STS Spearman, the result tables and model card, and the evaluation command.

    sts.py        Spearman of cosine against gold scores at every prefix dim
    report.py     markdown tables of results, and the model card a saved model carries
    evaluate.py   python -m mrl.eval: STS and retrieval at every dim (and precision) for saved models
"""

from mrl.eval.report import markdown_table
from mrl.eval.sts import evaluate_sts, sts_spearman_by_dim

__all__ = ["evaluate_sts", "sts_spearman_by_dim", "markdown_table"]
