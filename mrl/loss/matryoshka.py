"""Matryoshka Representation Learning (Kusupati et al., NeurIPS 2022): a loss that wraps a loss.

An embedding model is trained so that every prefix of its embedding is an embedding of its own. The base loss
is computed on the first d dims of every embedding, re-normalised, for several d, and the results are
weighted and summed:

    L = Σ_{d ∈ dims} w_d · L_base( [normalize(e[:, :d]) for e in embeddings], labels )

All dims come from ONE encoder forward: each only slices it, so they share that forward and its backward.
`per_dim_losses` below is that loop, the definition. mrl.loss.nested computes the same per-dim losses for every d
at once (prefix sums); passed as `nested_loss`, it replaces the loop, and tests/test_nested.py pins the two
equal in value and gradient. Training uses it. What goes beyond plain MRL (dim weights by rule or learned, a
few dims per step, prefix distillation) is in mrl.loss.variants, and 2D Matryoshka in mrl.loss.two_d. Each of
them returns a `LossParts`: the total and its named parts, each dim's loss apart from the options' terms.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrl.cli import naming
from mrl.loss.device import device_constant


@dataclass(frozen=True)
class LossParts:
    """What every loss of the chain returns (MatryoshkaLoss, the options of mrl.loss.variants, 2D, the Objective),
    the total beside its named parts, as open_clip's losses return theirs:

        total     the scalar to back-propagate: Σ_d w_d · L_d plus each option's weighted terms
        per_dim   {d: L_d}, each dim's unweighted loss, detached: exactly the dims this call trained, largest first
        terms     {name: value}, each option's term, unweighted and detached: distill_d<d>, teacher_kl_d<d>,
                  teacher_mse_d<d> (one per student dim), layer<l>, kl_layer<l> (2D, one per earlier layer)

    A wrapper adds to `total` and `terms` (`plus`), never to `per_dim`: its keys stay the trained dims.
    """

    total: Tensor
    per_dim: dict[int, Tensor]
    terms: dict[str, Tensor] = field(default_factory=dict)

    def plus(self, weighted: Tensor, terms: dict[str, Tensor]) -> "LossParts":
        """These parts with `weighted` added to the total and `terms` (detached here) to the terms."""
        detached = {name: value.detach() for name, value in terms.items()}
        return LossParts(self.total + weighted, self.per_dim, {**self.terms, **detached})


def per_dim_losses(base_loss: Callable[..., Tensor], embeddings: list[Tensor], labels: Tensor | None,
                   dims: Sequence[int], **loss_kwargs) -> Tensor:
    """The base loss at each prefix, re-normalised: (len(dims),), in dims' order."""
    return torch.stack([base_loss([F.normalize(e[:, :d], dim=-1) for e in embeddings], labels, **loss_kwargs)
                        for d in dims])


class MatryoshkaLoss(nn.Module):
    """L = Σ_d w_d · L_base(normalize(e[:, :d]) for every column e), over `dims`.

    base_loss(embeddings, labels, **kwargs) -> scalar: any loss on a list of (B, D) columns, e.g. a function of
    mrl.loss.base with its keyword arguments bound. weights: one per dim, in dims' order (default: all 1).
    nested_loss(embeddings, labels, dims=[...], **kwargs) -> (len(dims),), optional: the same losses for all
    dims at once (mrl.loss.nested), used instead of the loop.

    forward(embeddings, labels, *, dims, **kwargs) -> LossParts: the total and each dim's unweighted loss
    (per_dim; no terms). dims: the dims this call trains, some of `dims`, largest first: all of them, or a
    mrl.loss.variants.DimSampler's draw (mrl.loss.objective.Objective decides, once per step, and every loss of
    the chain trains the dims it is given). Extra keyword arguments (e.g. `rows`, for cross-device negatives) go to
    the loss.
    """

    def __init__(self, base_loss: Callable[..., Tensor], dims: Sequence[int], weights: Sequence[float] | None = None,
                 nested_loss: Callable[..., Tensor] | None = None):
        super().__init__()
        with naming("dims"):
            check_dims(dims)
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        with naming("weights"):
            check_weights(weights, dims)
        self.base_loss, self.nested_loss = base_loss, nested_loss
        self.dims = sorted(dims, reverse=True)
        self.weight_of = dict(zip(dims, weights))

    def forward(self, embeddings: list[Tensor], labels: Tensor | None = None, *, dims: Sequence[int],
                **loss_kwargs) -> LossParts:
        dims = list(dims)
        if not dims or dims != sorted(set(dims), reverse=True) or not set(dims) <= self.weight_of.keys():
            raise ValueError(f"dims: the dims to train must be some of {self.dims}, largest first; got {dims}")
        width = embeddings[0].shape[-1]
        if max(dims) > width:
            raise ValueError(f"dims: dim {max(dims)} is larger than the embeddings' width {width}")
        if self.nested_loss is None:
            losses = per_dim_losses(self.base_loss, embeddings, labels, dims, **loss_kwargs)  # (n,)
        else:
            losses = self.nested_loss(embeddings, labels, dims=dims, **loss_kwargs)  # (n,): the same, fused
        return LossParts(self.weigh(losses, dims), dict(zip(dims, losses.detach().unbind())))

    def weigh(self, losses: Tensor, dims: Sequence[int]) -> Tensor:
        """Σ_d w_d · L_d (the weights are made once per device: no host sync per step)."""
        weights = device_constant(tuple(self.weight_of[d] for d in dims), losses.device, losses.dtype)
        return (losses * weights).sum()

    def current_weights(self) -> dict[int, float]:
        """Each dim's weight, largest dim first."""
        return {d: self.weight_of[d] for d in self.dims}

    def extra_repr(self) -> str:
        return f"dims={self.dims}, weights={list(self.current_weights().values())}"


def check_dims(dims: Sequence[int], width: int | None = None) -> None:
    """Raise ValueError unless dims are distinct positive integers, none above `width`. The message names no
    parameter or field: the caller does (mrl.cli.naming)."""
    if not dims:
        raise ValueError(f"needs at least one dimension, got {list(dims)}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise ValueError(f"every dim must be a positive integer, got {d!r} in {list(dims)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"duplicate dims in {list(dims)}")
    if width is not None and max(dims) > width:
        raise ValueError(f"dim {max(dims)} is larger than the model's embedding size {width}")


def check_weights(weights: Sequence[float], dims: Sequence[int]) -> None:
    """Raise ValueError unless there is one finite weight >= 0 per dim (the caller names the field, as check_dims)."""
    if len(weights) != len(dims):
        raise ValueError(f"got {len(weights)} weights for {len(dims)} dims {list(dims)}")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"every weight must be a finite number >= 0, got {list(weights)}")
