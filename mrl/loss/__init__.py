"""Losses: pure functions of embeddings, and the Matryoshka sum over prefixes built on them.

    base.py         contrastive (InfoNCE / MNRL) and CoSENT at one width; the cosine matrix; false negatives
    nested.py       the same losses at every prefix at once, from block products (the exact fast path)
    matryoshka.py   MatryoshkaLoss: Σ_d w_d · L(first d dims), the loop and the prefix-sum path beside it
    variants.py     dim weights (rules, learned), dim sampling, prefix and teacher distillation
    quantisation.py every prefix also trained as stored in int8 / int4 / binary codes (straight-through), regularisers
    two_d.py        2D Matryoshka: earlier layers' embeddings too, with a KL to the last layer's
    objective.py    one training objective: the above as the config's loss section combines them
    dist.py         gather(x): every process's embeddings, with the gradient each rank receives
    device.py       constants made once per device
"""

from mrl.loss.base import contrastive_loss, cosent_loss, cosine_matrix
from mrl.loss.matryoshka import LossParts, MatryoshkaLoss, check_dims

__all__ = ["contrastive_loss", "cosent_loss", "cosine_matrix", "LossParts", "MatryoshkaLoss", "check_dims"]
