"""Losses on embeddings. Each takes the list of embedding tensors of one batch, one (B, D) tensor per text
column, plus the labels where the loss needs them, and returns a scalar. No loss ever sees the model.

Both losses score pairs by cosine similarity, so they are invariant to the scale of each embedding: a
Matryoshka prefix e[:, :d] and its re-normalised version give the same value.
"""

from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_i, b_j) for every pair of rows.  a: (N, D), b: (M, D) -> (N, M)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def nested_cosine_matrices(a: Tensor, b: Tensor, dims: list[int]) -> Tensor:
    """cos(a_i[:d], b_j[:d]) for every pair of rows and every d in `dims`: (len(dims), N, M), in dims' order.

    a: (N, D), b: (M, D). With the dims sorted d_1 < d_2 < ... and d_0 = 0, the dot products are prefix sums
    of block products and the norms prefix sums of squares:

        A_k = Σ_{l<=k} a[:, d_{l-1}:d_l] · b[:, d_{l-1}:d_l]ᵀ,   ‖a_i[:d_k]‖² = Σ_{c<d_k} a_ic²,
        cos_k = A_k / (‖a[:d_k]‖ ‖b[:d_k]‖ᵀ)

    so all dims together cost one full-width matmul (in blocks), not one matmul per dim.
    """
    ascending = sorted(range(len(dims)), key=lambda i: dims[i])
    bounds = [0] + [dims[i] for i in ascending]
    blocks = torch.stack([a[:, lo:hi] @ b[:, lo:hi].T for lo, hi in zip(bounds, bounds[1:])])  # (n, N, M)
    dots = blocks.to(_sum_dtype(a)).cumsum(0)
    norm_a, norm_b = _prefix_norms(a, bounds[1:]), _prefix_norms(b, bounds[1:])  # (n, N), (n, M)
    cos = dots / (norm_a[:, :, None] * norm_b[:, None, :])
    back = sorted(range(len(dims)), key=ascending.__getitem__)  # ascending's inverse: back to `dims`' order
    return cos[device_constant(tuple(back), a.device, torch.long)]


def nested_pair_cosines(a: Tensor, b: Tensor, dims: list[int]) -> Tensor:
    """cos(a_i[:d], b_i[:d]) of row pairs for every d in `dims`: (len(dims), N), by prefix sums of a_i·b_i."""
    ends = _last_columns(dims, a.device)
    dots = (a.to(_sum_dtype(a)) * b.to(_sum_dtype(b))).cumsum(-1)[:, ends].T  # (n, N)
    return dots / (_prefix_norms(a, dims) * _prefix_norms(b, dims))


@lru_cache(maxsize=None)
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    """torch.tensor(values, dtype=dtype) on `device`, made once per (values, device, dtype) and shared: never
    modify it. (The dtype is part of the key, since (1, 2) and (1.0, 2.0) are equal keys.)

    On a GPU a tensor made from Python data is a host-to-device copy that waits for every kernel queued before
    it (a host sync); made once, the training step's index and weight tensors cost no sync."""
    with torch.inference_mode(False):  # a first call under inference mode must not cache an inference tensor
        return torch.tensor(values, device=device, dtype=dtype)


def _last_columns(dims: list[int], device: torch.device) -> Tensor:
    """The column index of each prefix's last dim, d - 1 for every d in `dims`, as a (cached) device tensor."""
    return device_constant(tuple(d - 1 for d in dims), device, torch.long)


def _sum_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # sums in float32 at least, also under bf16 autocast


def _prefix_norms(x: Tensor, dims: list[int]) -> Tensor:
    """‖x_i[:d]‖ for every d in `dims` from one cumulative sum of squares: (len(dims), N), floored at
    F.normalize's eps."""
    ends = _last_columns(dims, x.device)
    return x.to(_sum_dtype(x)).pow(2).cumsum(-1)[:, ends].T.sqrt().clamp_min(1e-12)


def contrastive_loss(embeddings: list[Tensor], labels: Tensor | None = None, *, scale: float = 20.0,
                     symmetric: bool = False, rows: Tensor | None = None) -> Tensor:
    """In-batch-negatives contrastive loss (InfoNCE; "MultipleNegativesRankingLoss").

    embeddings = [q, p, n_1, ..., n_k]: anchors q and positives p of shape (B, D), plus k >= 0 hard-negative
    columns. Each anchor q_i must pick its own positive p_i out of every candidate of the batch:
    C = [p; n_1; ...; n_k] of shape ((1+k)·B, D), so the other rows' positives and all hard negatives are
    its negatives.

        L = -1/B Σ_i log( exp(s·cos(q_i, p_i)) / Σ_j exp(s·cos(q_i, C_j)) ),   s = scale (inverse temperature)

    symmetric=True averages L with the reverse direction, each positive picking its anchor among all anchors:
        L_sym = ( L + -1/B Σ_i log( exp(s·cos(p_i, q_i)) / Σ_j exp(s·cos(p_i, q_j)) ) ) / 2

    Cross-device negatives: the columns hold the rows of every process (see mrl.dist), and `rows` (b,) are the
    indices of this process's own anchors; the mean then runs over those b anchors, each against every
    process's candidates. Default: all rows. `labels` is ignored (the targets are the diagonal); it is
    accepted so that every loss has one signature.
    """
    _check_contrastive(embeddings)
    q, p, candidates = embeddings[0], embeddings[1], torch.cat(embeddings[1:])
    rows = torch.arange(len(q), device=q.device) if rows is None else rows
    loss = F.cross_entropy(scale * cosine_matrix(q[rows], candidates), rows)  # (b, (1+k)·B) logits
    if symmetric:  # positive p_i against every anchor
        loss = (loss + F.cross_entropy(scale * cosine_matrix(p[rows], q), rows)) / 2
    return loss


def contrastive_losses_nested(embeddings: list[Tensor], labels: Tensor | None = None, *, dims: list[int],
                              scale: float = 20.0, symmetric: bool = False, rows: Tensor | None = None) -> Tensor:
    """contrastive_loss at every prefix length d in `dims` at once: (len(dims),) losses, in dims' order.

    Equal to [contrastive_loss([e[:, :d] for e in embeddings], ...) for d in dims], with the cosine matrices
    of all dims from nested_cosine_matrices (one full-width matmul in blocks).
    """
    _check_contrastive(embeddings)
    q, p, candidates = embeddings[0], embeddings[1], torch.cat(embeddings[1:])
    rows = torch.arange(len(q), device=q.device) if rows is None else rows
    n = len(dims)

    def losses(cos: Tensor) -> Tensor:  # (n, b, C) cosines -> (n,) mean cross-entropy per dim
        return F.cross_entropy(scale * cos.flatten(0, 1), rows.repeat(n), reduction="none").view(n, -1).mean(1)

    loss = losses(nested_cosine_matrices(q[rows], candidates, dims))
    if symmetric:
        loss = (loss + losses(nested_cosine_matrices(p[rows], q, dims))) / 2
    return loss


def _check_contrastive(embeddings: list[Tensor]) -> None:
    if len(embeddings) < 2:
        raise ValueError(f"contrastive_loss needs at least 2 text columns (anchor, positive), got {len(embeddings)}")


def cosent_loss(embeddings: list[Tensor], labels: Tensor, *, scale: float = 20.0) -> Tensor:
    """CoSENT (Su, 2022): rank the pairs of a batch by cosine in the order of their gold scores.

    embeddings = [a, b], each (B, D); labels: (B,) gold similarity y_i of the pair (a_i, b_i); c_i = cos(a_i, b_i).
    Every ordered pair of pairs (i, j) with y_i > y_j is penalised when c_j comes close to or above c_i:

        L = log( 1 + Σ_{(i, j): y_i > y_j} exp(s·(c_j − c_i)) ),   s = scale

    Only the order of the labels matters, so their range (0..1 or 0..5) does not change the loss.
    """
    _check_cosent(embeddings, labels)
    a, b = embeddings
    return _cosent_from_cosines(F.cosine_similarity(a, b, dim=-1)[None], labels, scale)[0]


def cosent_losses_nested(embeddings: list[Tensor], labels: Tensor, *, dims: list[int], scale: float = 20.0) -> Tensor:
    """cosent_loss at every prefix length d in `dims` at once: (len(dims),) losses, in dims' order; the pair
    cosines of all dims come from prefix sums (nested_pair_cosines)."""
    _check_cosent(embeddings, labels)
    return _cosent_from_cosines(nested_pair_cosines(*embeddings, dims), labels, scale)


def _cosent_from_cosines(cos: Tensor, labels: Tensor, scale: float) -> Tensor:
    """(n, B) pair cosines c -> (n,) CoSENT losses."""
    diff = scale * (cos[:, None, :] - cos[:, :, None])  # (n, B, B): diff[k, i, j] = s·(c_j − c_i)
    ordered = labels[:, None] > labels[None, :]  # (B, B): y_i > y_j
    terms = diff.masked_fill(~ordered, float("-inf")).flatten(1)  # (n, B·B)
    zero = terms.new_zeros(len(terms), 1)  # the "1 +" inside the log
    return torch.logsumexp(torch.cat([zero, terms], dim=1), dim=1)


def _check_cosent(embeddings: list[Tensor], labels: Tensor | None) -> None:
    if len(embeddings) != 2:
        raise ValueError(f"cosent_loss needs exactly 2 text columns (sentence1, sentence2), got {len(embeddings)}")
    if labels is None:
        raise ValueError("cosent_loss needs a label (score) for every pair")


def contrastive_scores_nested(embeddings: list[Tensor], *, dims: list[int], rows: Tensor | None = None) -> Tensor:
    """What the contrastive loss ranks, at every d in `dims`: each anchor's cosines to every candidate of the
    batch, (len(dims), b, (1+k)·B) (for prefix self-distillation, mrl.matryoshka.MatryoshkaLoss)."""
    _check_contrastive(embeddings)
    q = embeddings[0] if rows is None else embeddings[0][rows]
    return nested_cosine_matrices(q, torch.cat(embeddings[1:]), dims)


def cosent_scores_nested(embeddings: list[Tensor], *, dims: list[int]) -> Tensor:
    """What CoSENT ranks, at every d in `dims`: the batch's pair cosines as one row, (len(dims), 1, B)."""
    if len(embeddings) != 2:
        raise ValueError(f"cosent needs exactly 2 text columns (sentence1, sentence2), got {len(embeddings)}")
    return nested_pair_cosines(*embeddings, dims)[:, None, :]


LOSSES = {"contrastive": contrastive_loss, "cosent": cosent_loss}
NESTED_LOSSES = {"contrastive": contrastive_losses_nested, "cosent": cosent_losses_nested}  # all dims at once
NESTED_SCORES = {"contrastive": contrastive_scores_nested, "cosent": cosent_scores_nested}


def losses_for(name: str, scale: float, symmetric: bool = False) -> tuple:
    """The loss called `name` and its all-dims-at-once form (LOSSES, NESTED_LOSSES), with their settings bound:
    scale, and symmetric for the contrastive loss (CoSENT has no such setting)."""
    kwargs = {"scale": scale, **({"symmetric": symmetric} if name == "contrastive" else {})}
    return partial(LOSSES[name], **kwargs), partial(NESTED_LOSSES[name], **kwargs)
