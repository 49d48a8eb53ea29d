"""Matryoshka Representation Learning (Kusupati et al., NeurIPS 2022) as a loss that wraps a loss."""

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_dims(dims: Sequence[int], weights: Sequence[float] | None = None, n_dims_per_step: int | None = None,
               embedding_dim: int | None = None, field: str = "dims") -> None:
    """Raise ValueError, naming `field`, if the nested dims (and their weights) cannot be trained."""
    if not dims:
        raise ValueError(f"{field}: needs at least one dimension, got {list(dims)}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise ValueError(f"{field}: every dim must be a positive integer, got {d!r} in {list(dims)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"{field}: duplicate dims in {list(dims)}")
    if embedding_dim is not None and max(dims) > embedding_dim:
        raise ValueError(f"{field}: dim {max(dims)} is larger than the model's embedding size {embedding_dim}")
    prefix = field.rsplit("dims", 1)[0]  # "loss.dims" -> "loss."
    if weights is not None:
        if len(weights) != len(dims):
            raise ValueError(f"{prefix}dim_weights: got {len(weights)} weights for {len(dims)} dims {list(dims)}")
        if any(not isinstance(w, (int, float)) or w < 0 for w in weights):
            raise ValueError(f"{prefix}dim_weights: every weight must be a number >= 0, got {list(weights)}")
    if n_dims_per_step is not None and not 1 <= n_dims_per_step <= len(dims):
        raise ValueError(f"{prefix}n_dims_per_step: must be between 1 and len(dims)={len(dims)}, got {n_dims_per_step}")


class MatryoshkaLoss(nn.Module):
    """Sum a base loss over nested prefixes of the same embeddings.

        L = Σ_{d ∈ dims} w_d · L_base( [normalize(e[:, :d]) for e in embeddings], labels )

    One encoder forward gives `embeddings` (one (B, D) tensor per text column); every dim only slices it,
    so all dims share that forward and its backward. Dims may come in any order (they are sorted, largest
    first, with their weights); weights default to 1. With `n_dims_per_step=k`, each call trains a random
    subset of k dims (drawn from Python's `random`, which the training loop seeds and checkpoints).

    forward returns (total, per_dim): the weighted sum, and each trained dim's unweighted loss, detached,
    for logging. The base loss is any callable base_loss(embeddings, labels) -> scalar, e.g. a function of
    `mrl.losses` with its keyword arguments bound by functools.partial.

    nested_loss, optional: the same loss for many dims at once, nested_loss(embeddings, labels, dims=[...])
    -> (len(dims),) (mrl.losses.NESTED_LOSSES: prefix sums give every dim's cosines for about the cost of
    one full-width matmul). It must equal the base loss on each prefix; it is used instead of the loop.
    Extra keyword arguments of forward (e.g. `rows` for cross-device negatives) go to the loss.
    """

    def __init__(self, base_loss: Callable[..., Tensor], dims: Sequence[int], weights: Sequence[float] | None = None,
                 n_dims_per_step: int | None = None, nested_loss: Callable[..., Tensor] | None = None):
        super().__init__()
        check_dims(dims, weights, n_dims_per_step)
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        by_size = sorted(zip(dims, weights), key=lambda dw: -dw[0])
        self.base_loss = base_loss
        self.dims = [d for d, _ in by_size]
        self.weights = [w for _, w in by_size]
        self.n_dims_per_step = n_dims_per_step
        self.nested_loss = nested_loss

    def forward(self, embeddings: list[Tensor], labels: Tensor | None = None, **loss_kwargs
                ) -> tuple[Tensor, dict[int, Tensor]]:
        width = embeddings[0].shape[-1]
        if self.dims[0] > width:
            raise ValueError(f"dims: dim {self.dims[0]} is larger than the embeddings' width {width}")
        chosen = range(len(self.dims))
        if self.n_dims_per_step is not None:
            chosen = sorted(random.sample(chosen, self.n_dims_per_step))
        dims, weights = [self.dims[i] for i in chosen], [self.weights[i] for i in chosen]
        if self.nested_loss is not None:
            losses = self.nested_loss(embeddings, labels, dims=dims, **loss_kwargs)  # (n,)
        else:
            losses = torch.stack([self.base_loss([F.normalize(e[:, :d], dim=-1) for e in embeddings], labels,
                                                 **loss_kwargs) for d in dims])
        total = (losses * losses.new_tensor(weights)).sum()
        return total, dict(zip(dims, losses.detach().unbind()))

    def extra_repr(self) -> str:
        return f"dims={self.dims}, weights={self.weights}, n_dims_per_step={self.n_dims_per_step}"
