"""Losses on embeddings. Each takes the list of embedding tensors of one batch, one (B, D) tensor per text
column, plus the labels where the loss needs them, and returns a scalar. No loss ever sees the model.

Both losses score pairs by cosine similarity, so they are invariant to the scale of each embedding: a
Matryoshka prefix e[:, :d] and its re-normalised version give the same value.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_i, b_j) for every pair of rows.  a: (N, D), b: (M, D) -> (N, M)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def contrastive_loss(embeddings: list[Tensor], labels: Tensor | None = None, *, scale: float = 20.0,
                     symmetric: bool = False) -> Tensor:
    """In-batch-negatives contrastive loss (InfoNCE; "MultipleNegativesRankingLoss").

    embeddings = [q, p, n_1, ..., n_k]: anchors q and positives p of shape (B, D), plus k >= 0 hard-negative
    columns. Each anchor q_i must pick its own positive p_i out of every candidate of the batch:
    C = [p; n_1; ...; n_k] of shape ((1+k)·B, D), so the other rows' positives and all hard negatives are
    its negatives.

        L = -1/B Σ_i log( exp(s·cos(q_i, p_i)) / Σ_j exp(s·cos(q_i, C_j)) ),   s = scale (inverse temperature)

    symmetric=True averages L with the reverse direction, each positive picking its anchor among all anchors:
        L_sym = ( L + -1/B Σ_i log( exp(s·cos(p_i, q_i)) / Σ_j exp(s·cos(p_i, q_j)) ) ) / 2

    `labels` is ignored (the targets are the diagonal); it is accepted so that every loss has one signature.
    """
    if len(embeddings) < 2:
        raise ValueError(f"contrastive_loss needs at least 2 text columns (anchor, positive), got {len(embeddings)}")
    q, candidates = embeddings[0], torch.cat(embeddings[1:])
    logits = scale * cosine_matrix(q, candidates)  # (B, (1+k)·B)
    targets = torch.arange(len(q), device=q.device)  # q_i's positive is candidate i
    loss = F.cross_entropy(logits, targets)
    if symmetric:
        reverse_logits = logits[:, : len(q)].T  # (B, B): positive p_i against every anchor
        loss = (loss + F.cross_entropy(reverse_logits, targets)) / 2
    return loss


def cosent_loss(embeddings: list[Tensor], labels: Tensor, *, scale: float = 20.0) -> Tensor:
    """CoSENT (Su, 2022): rank the pairs of a batch by cosine in the order of their gold scores.

    embeddings = [a, b], each (B, D); labels: (B,) gold similarity y_i of the pair (a_i, b_i); c_i = cos(a_i, b_i).
    Every ordered pair of pairs (i, j) with y_i > y_j is penalised when c_j comes close to or above c_i:

        L = log( 1 + Σ_{(i, j): y_i > y_j} exp(s·(c_j − c_i)) ),   s = scale

    Only the order of the labels matters, so their range (0..1 or 0..5) does not change the loss.
    """
    if len(embeddings) != 2:
        raise ValueError(f"cosent_loss needs exactly 2 text columns (sentence1, sentence2), got {len(embeddings)}")
    if labels is None:
        raise ValueError("cosent_loss needs a label (score) for every pair")
    a, b = embeddings
    cos = F.cosine_similarity(a, b, dim=-1)  # (B,)
    diff = scale * (cos[None, :] - cos[:, None])  # (B, B): diff[i, j] = s·(c_j − c_i)
    ordered = labels[:, None] > labels[None, :]  # (B, B): y_i > y_j
    terms = diff.masked_fill(~ordered, float("-inf")).flatten()
    zero = torch.zeros(1, dtype=terms.dtype, device=terms.device)  # the "1 +" inside the log
    return torch.logsumexp(torch.cat([zero, terms]), dim=0)


LOSSES = {"contrastive": contrastive_loss, "cosent": cosent_loss}
