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


def check_n_layers_per_step(n_layers_per_step: int, n_layers: int) -> None:
    """2D Matryoshka draws earlier layers from 1..L-1: at least one, and fewer than L."""
    if not 1 <= n_layers_per_step < n_layers:
        raise ValueError(f"loss.n_layers_per_step: must be in 1..{n_layers - 1} for a {n_layers}-layer model, "
                         f"got {n_layers_per_step}")


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


class Matryoshka2dLoss(nn.Module):
    """2D Matryoshka (Li et al., 2024, "2D Matryoshka Sentence Embeddings"): nested dims AND nested depth.

    Takes the columns of `Encoder(features, all_layers=True)`, each (B, L, D), where [:, l-1] is the embedding
    pooled from the first l layers. Each step trains the last layer and n_layers_per_step earlier layers S,
    drawn at random from 1..L-1:

        L_2D = L_M(e^L) + Σ_{l ∈ S} [ w_layer · L_M(e^l) + w_kl · KL( P^L ‖ P^l ) ]

    L_M is the Matryoshka loss (every dim); P^l_i = softmax_j( cos(q^l_i, c^l_j) / τ ), each anchor's
    distribution over the batch's candidates (the other columns), at full width; the final layer's P^L is the
    teacher, detached, and the KL is averaged over anchors. Nothing here touches the model, so it runs under
    DDP unchanged (the layers come from one forward's hidden states).
    """

    def __init__(self, matryoshka: MatryoshkaLoss, n_layers_per_step: int = 1, layer_weight: float = 1.0,
                 kl_weight: float = 1.0, kl_temperature: float = 0.3):
        super().__init__()
        self.matryoshka = matryoshka
        self.n_layers_per_step, self.layer_weight = n_layers_per_step, layer_weight
        self.kl_weight, self.kl_temperature = kl_weight, kl_temperature

    def forward(self, embeddings: list[Tensor], labels: Tensor | None = None, rows: Tensor | None = None,
                **loss_kwargs) -> tuple[Tensor, dict]:
        n_layers = embeddings[0].shape[1]
        check_n_layers_per_step(self.n_layers_per_step, n_layers)
        if rows is not None:
            loss_kwargs["rows"] = rows
        final = [e[:, -1] for e in embeddings]
        total, per_dim = self.matryoshka(final, labels, **loss_kwargs)
        teacher = self._log_distribution(final, rows).detach()
        for layer in sorted(random.sample(range(1, n_layers), self.n_layers_per_step)):
            columns = [e[:, layer - 1] for e in embeddings]
            layer_loss, _ = self.matryoshka(columns, labels, **loss_kwargs)
            student = self._log_distribution(columns, rows)
            kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")  # Σ P^L (log P^L − log P^l) / b
            total = total + self.layer_weight * layer_loss + self.kl_weight * kl
            per_dim[f"layer{layer}"], per_dim[f"kl_layer{layer}"] = layer_loss.detach(), kl.detach()
        return total, per_dim

    def _log_distribution(self, columns: list[Tensor], rows: Tensor | None) -> Tensor:
        q, candidates = F.normalize(columns[0], dim=-1), F.normalize(torch.cat(columns[1:]), dim=-1)
        q = q if rows is None else q[rows]
        return F.log_softmax(q @ candidates.T / self.kl_temperature, dim=-1)  # (b, C)

    def extra_repr(self) -> str:
        return (f"n_layers_per_step={self.n_layers_per_step}, layer_weight={self.layer_weight}, "
                f"kl_weight={self.kl_weight}, kl_temperature={self.kl_temperature}")
