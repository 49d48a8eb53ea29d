"""mrl: train Matryoshka embedding models in plain PyTorch."""

from mrl.model import Encoder, mean_pool
from mrl.loss import MatryoshkaLoss, check_dims, contrastive_loss, cosent_loss, cosine_matrix
from mrl.eval import evaluate_sts, markdown_table, sts_spearman_by_dim

__all__ = ["Encoder", "mean_pool", "contrastive_loss", "cosent_loss", "cosine_matrix", "MatryoshkaLoss",
           "check_dims", "evaluate_sts", "sts_spearman_by_dim", "markdown_table"]
