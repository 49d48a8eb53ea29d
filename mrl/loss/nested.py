"""The losses of mrl.loss.base at every prefix length at once, for the cost of about one full-width computation.

MRL scores the same batch at several widths d: the definition (mrl.loss.matryoshka) slices, re-normalises and
calls the loss once per d. Here every d comes from one pass instead. With the dims sorted d_1 < d_2 < ...
and d_0 = 0, the dot products of the d_k-dim prefixes are prefix sums of block products, and their norms
prefix sums of squares:

    A_k = Σ_{l<=k} a[:, d_{l-1}:d_l] · b[:, d_{l-1}:d_l]ᵀ,   ‖a_i[:d_k]‖² = Σ_{c<d_k} a_ic²,
    cos_k = A_k / (‖a[:d_k]‖ ‖b[:d_k]‖ᵀ)

so all dims together cost one full-width matmul (in blocks), not one matmul per dim. Each function is pinned
equal to the per-dim loop, in value and gradient, by tests/test_nested.py.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from mrl.loss.device import device_constant
from mrl.loss.base import LOSSES, check_columns, check_labels, cosent_from_cosines


def nested_cosine_matrices(a: Tensor, b: Tensor, dims: list[int]) -> Tensor:
    """cos(a_i[:d], b_j[:d]) for every pair of rows and every d in `dims`: (len(dims), N, M), in dims' order.
    a: (N, D), b: (M, D)."""
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


def _last_columns(dims: list[int], device: torch.device) -> Tensor:
    """The column index of each prefix's last dim, d - 1 for every d in `dims`, as a (cached) device tensor."""
    return device_constant(tuple(d - 1 for d in dims), device, torch.long)


def _sum_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # sums in float32 at least, also under bf16 autocast


def _prefix_norms(x: Tensor, dims: list[int]) -> Tensor:
    """‖x_i[:d]‖ for every d in `dims` from one cumulative sum of squares: (len(dims), N), floored at
    F.normalize's eps. The floor is taken before the square root (eps² under it): an all-zero prefix then has
    a finite gradient, as through F.normalize, where √0 would give NaN."""
    ends = _last_columns(dims, x.device)
    return x.to(_sum_dtype(x)).pow(2).cumsum(-1)[:, ends].T.clamp_min(1e-24).sqrt()


def contrastive_losses_nested(embeddings: list[Tensor], labels: Tensor | None = None, *, dims: list[int],
                              scale: float = 20.0, symmetric: bool = False, rows: Tensor | None = None,
                              exclude: Tensor | None = None) -> Tensor:
    """mrl.loss.base.contrastive_loss at every prefix length d in `dims` at once: (len(dims),), in dims' order; one
    `exclude` mask (false negatives, decided at full width) for every prefix."""
    check_columns("contrastive", len(embeddings))
    q, p, candidates = embeddings[0], embeddings[1], torch.cat(embeddings[1:])
    rows = torch.arange(len(q), device=q.device) if rows is None else rows
    n = len(dims)

    def losses(cos: Tensor) -> Tensor:  # (n, b, C) cosines -> (n,) mean cross-entropy per dim
        return F.cross_entropy(scale * cos.flatten(0, 1), rows.repeat(n), reduction="none").view(n, -1).mean(1)

    cos = nested_cosine_matrices(q[rows], candidates, dims)  # (n, b, C)
    loss = losses(cos if exclude is None else cos.masked_fill(exclude, float("-inf")))
    if symmetric:
        loss = (loss + losses(nested_cosine_matrices(p[rows], q, dims))) / 2
    return loss


def cosent_losses_nested(embeddings: list[Tensor], labels: Tensor, *, dims: list[int], scale: float = 20.0) -> Tensor:
    """mrl.loss.base.cosent_loss at every prefix length d in `dims` at once: (len(dims),), in dims' order."""
    check_columns("cosent", len(embeddings))
    check_labels(labels, len(embeddings[0]))
    return cosent_from_cosines(nested_pair_cosines(*embeddings, dims), labels, scale)


def contrastive_scores_nested(embeddings: list[Tensor], *, dims: list[int], rows: Tensor | None = None,
                              exclude: Tensor | None = None) -> Tensor:
    """What the contrastive loss ranks, at every d in `dims`: each anchor's cosines to every candidate of the
    batch, (len(dims), b, (1+k)·B): its in-batch similarity distribution, before the softmax. (`exclude` is
    accepted for one signature with the loss, and not applied: a distillation compares whole distributions.)"""
    check_columns("contrastive", len(embeddings))
    q = embeddings[0] if rows is None else embeddings[0][rows]
    return nested_cosine_matrices(q, torch.cat(embeddings[1:]), dims)


def cosent_scores_nested(embeddings: list[Tensor], *, dims: list[int]) -> Tensor:
    """What CoSENT ranks, at every d in `dims`: the batch's pair cosines as one row, (len(dims), 1, B)."""
    check_columns("cosent", len(embeddings))
    return nested_pair_cosines(*embeddings, dims)[:, None, :]


NESTED_LOSSES = {"contrastive": contrastive_losses_nested, "cosent": cosent_losses_nested}
NESTED_SCORES = {"contrastive": contrastive_scores_nested, "cosent": cosent_scores_nested}


def losses_for(name: str, scale: float, symmetric: bool = False) -> tuple:
    """The loss called `name` and its all-dims-at-once form (LOSSES, NESTED_LOSSES), with their settings bound:
    scale, and symmetric for the contrastive loss (CoSENT has no such setting)."""
    kwargs = {"scale": scale, **({"symmetric": symmetric} if name == "contrastive" else {})}
    return partial(LOSSES[name], **kwargs), partial(NESTED_LOSSES[name], **kwargs)
