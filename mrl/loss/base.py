"""Losses on embeddings, at one width. Each takes the list of embedding tensors of one batch, one (B, D)
tensor per text column, plus the labels where the loss needs them, and returns a scalar. No loss ever sees
the model.

Both losses score pairs by cosine similarity, so they are invariant to the scale of each embedding: a
Matryoshka prefix e[:, :d] and its re-normalised version give the same value. The same losses for every
prefix at once are in mrl.loss.nested; the Matryoshka sum over prefixes is mrl.loss.matryoshka.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_i, b_j) for every pair of rows.  a: (N, D), b: (M, D) -> (N, M)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def contrastive_loss(embeddings: list[Tensor], labels: Tensor | None = None, *, scale: float = 20.0,
                     symmetric: bool = False, rows: Tensor | None = None, exclude: Tensor | None = None) -> Tensor:
    """In-batch-negatives contrastive loss (InfoNCE; "MultipleNegativesRankingLoss").

    embeddings = [q, p, n_1, ..., n_k]: anchors q and positives p of shape (B, D), plus k >= 0 hard-negative
    columns. Each anchor q_i must pick its own positive p_i out of every candidate of the batch:
    C = [p; n_1; ...; n_k] of shape ((1+k)·B, D), so the other rows' positives and all hard negatives are
    its negatives.

        L = -1/B Σ_i log( exp(s·cos(q_i, p_i)) / Σ_j exp(s·cos(q_i, C_j)) ),   s = scale (inverse temperature)

    symmetric=True averages L with the reverse direction, each positive picking its anchor among all anchors:
        L_sym = ( L + -1/B Σ_i log( exp(s·cos(p_i, q_i)) / Σ_j exp(s·cos(p_i, q_j)) ) ) / 2

    Cross-device negatives: the columns hold the rows of every process (see mrl.loss.dist), and `rows` (b,) are the
    indices of this process's own anchors; the mean then runs over those b anchors, each against every
    process's candidates. Default: all rows. `labels` is ignored (the targets are the diagonal); it is
    accepted so that every loss has one signature.

    exclude (b, (1+k)·B) bool, optional: candidates left out of each anchor's denominator (false negatives,
    see false_negatives), its own positive never among them; the symmetric direction is not masked.
    """
    check_columns("contrastive", len(embeddings))
    q, p, candidates = embeddings[0], embeddings[1], torch.cat(embeddings[1:])
    rows = torch.arange(len(q), device=q.device) if rows is None else rows
    logits = scale * cosine_matrix(q[rows], candidates)  # (b, (1+k)·B)
    loss = F.cross_entropy(logits if exclude is None else logits.masked_fill(exclude, float("-inf")), rows)
    if symmetric:  # positive p_i against every anchor
        loss = (loss + F.cross_entropy(scale * cosine_matrix(p[rows], q), rows)) / 2
    return loss


def false_negatives(embeddings: list[Tensor], margin: float, rows: Tensor | None = None) -> Tensor:
    """Which candidates of the contrastive loss are likely false negatives, (b, (1+k)·B) bool: those an anchor
    scores above its own positive plus `margin`, at the embeddings' full width,

        exclude_ij = cos(q_i, C_j) > cos(q_i, p_i) + margin,   j ≠ i (the positive itself stays)

    decided without a gradient, once, and used for every prefix (Qwen3-Embedding's and GIST's rule)."""
    check_columns("contrastive", len(embeddings))
    with torch.no_grad():
        q, candidates = embeddings[0], torch.cat(embeddings[1:])
        rows = torch.arange(len(q), device=q.device) if rows is None else rows
        cos = cosine_matrix(q[rows], candidates)  # (b, C)
        positive = cos.gather(1, rows[:, None])  # (b, 1)
        exclude = cos > positive + margin
        exclude[torch.arange(len(rows), device=q.device), rows] = False
    return exclude


def cosent_loss(embeddings: list[Tensor], labels: Tensor, *, scale: float = 20.0) -> Tensor:
    """CoSENT (Su, 2022): rank the pairs of a batch by cosine in the order of their gold scores.

    embeddings = [a, b], each (B, D); labels: (B,) gold similarity y_i of the pair (a_i, b_i); c_i = cos(a_i, b_i).
    Every ordered pair of pairs (i, j) with y_i > y_j is penalised when c_j comes close to or above c_i:

        L = log( 1 + Σ_{(i, j): y_i > y_j} exp(s·(c_j − c_i)) ),   s = scale

    Only the order of the labels matters, so their range (0..1 or 0..5) does not change the loss.
    """
    check_columns("cosent", len(embeddings))
    check_labels(labels, len(embeddings[0]))
    a, b = embeddings
    return cosent_from_cosines(F.cosine_similarity(a, b, dim=-1)[None], labels, scale)[0]


def cosent_from_cosines(cos: Tensor, labels: Tensor, scale: float) -> Tensor:
    """CoSENT of n sets of pair cosines at once: (n, B) cosines c, (B,) labels -> (n,) losses."""
    diff = scale * (cos[:, None, :] - cos[:, :, None])  # (n, B, B): diff[k, i, j] = s·(c_j − c_i)
    ordered = labels[:, None] > labels[None, :]  # (B, B): y_i > y_j
    terms = diff.masked_fill(~ordered, float("-inf")).flatten(1)  # (n, B·B)
    zero = terms.new_zeros(len(terms), 1)  # the "1 +" inside the log
    return torch.logsumexp(torch.cat([zero, terms], dim=1), dim=1)


def check_columns(name: str, n_columns: int) -> None:
    """Raise ValueError if loss `name` cannot take `n_columns` text columns."""
    if name == "contrastive" and n_columns < 2:
        raise ValueError(f"the contrastive loss needs at least 2 text columns (anchor, positive), got {n_columns}")
    if name == "cosent" and n_columns != 2:
        raise ValueError(f"the cosent loss needs exactly 2 text columns (sentence1, sentence2) and a score, "
                         f"got {n_columns} text columns")


def check_labels(labels: Tensor | None, n_rows: int) -> None:
    """Raise ValueError unless `labels` holds one score per pair, shape (B,): a (B, 1) column would broadcast
    into a (B, B) comparison and give a wrong loss without an error."""
    if labels is None:
        raise ValueError("the cosent loss needs a label (score) for every pair")
    if labels.shape != (n_rows,):
        raise ValueError(f"the cosent loss needs labels of shape ({n_rows},), one per pair; got {tuple(labels.shape)}")


LOSSES = {"contrastive": contrastive_loss, "cosent": cosent_loss}
