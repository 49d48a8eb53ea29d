"""mrl: train Matryoshka embedding models in plain PyTorch."""

from .encoder import Encoder, mean_pool
from .losses import contrastive_loss, cosent_loss, cosine_matrix
from .matryoshka import MatryoshkaLoss, check_dims
from .report import markdown_table
from .sts import evaluate_sts, sts_spearman_by_dim

__all__ = ["Encoder", "mean_pool", "contrastive_loss", "cosent_loss", "cosine_matrix", "MatryoshkaLoss",
           "check_dims", "evaluate_sts", "sts_spearman_by_dim", "markdown_table"]
