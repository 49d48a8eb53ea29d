"""Quantisation-aware Matryoshka: every trained prefix is also trained as a store will hold it, in int8, int4 or
binary codes, so that it survives truncation AND quantisation (loss.quantisation).

A store keeps one code per coordinate of the full-width unit embedding ê = e / ‖e‖ and truncates codes: the
d-prefix it holds is Q(ê)[:, :d]. Q acts coordinate by coordinate, with its ranges fixed at full width, so

    Q(ê)[:, :d] = Q(ê[:, :d])

and the terms of every trained d at one precision are the base loss on the prefixes of ONE tensor Q(ê): one call
of the all-dims-at-once loss (mrl.loss.nested, prefix sums). The quantisers, for coordinate c:

    int8, int4   Q(x)_c = s_c · clamp(round(x_c / s_c), −m, m),   s_c = r_c / m,   m = 127 (255 levels) | 7 (15)
                 r_c: the range of coordinate c, max_i |ê_ic| over calibration rows embedded by the initial model
                 before training (`calibrate`; mrl.run.quantisation), or one fixed r (loss.quantisation.range)
    binary       Q(x)_c = +1 if x_c > 0 else −1      (the bit mrl.retrieval.quantize.quantize_binary stores, as ±1)

trained through the straight-through estimator (Bengio et al., 2013), sg the stop-gradient:

    q(x) = Q(x) + (x − sg(x))      the value Q(x) exactly, the gradient of the identity

(x + sg(Q(x) − x) has the same gradient but rounds its value.) The base loss re-normalises each prefix as it does
for floats: a binary prefix b ∈ {±1}^d has ‖b‖ = √d, so its cosine is the scaled cosine b·b′/d = 1 − 2·Hamming/d,
what a Hamming search ranks by; an all-zero vector gives b = −1 (finite), an int code of 0 a prefix of norm 0
(floored by mrl.loss.nested: finite gradients). The objective:

    L = L_matryoshka + Σ_p λ_p Σ_{d ∈ dims} L_base( normalize(q_p(ê)[:, :d]) ) + μ · Σ_{d ∈ dims} R_d

λ_p: loss.quantisation.<p> (0: off), unweighted over dims as the distillation terms are; R_d, optional, regularises
the float prefixes x_i = normalize(ê_i[:d]) of each column's n rows, cos_ij their cosines, averaged over columns:

    spread_out     R_d = M1² + max(0, M2 − 1/d),  M1 = mean_{i≠j} cos_ij,  M2 = mean_{i≠j} cos_ij²
                   (Zhang et al., 2017, "Learning Spread-out Local Feature Descriptors": unit vectors spread
                   uniformly over d dims have M1 = 0 and M2 = 1/d)
    orthogonality  R_d = ‖(d/n)·XᵀX − I_d‖²_F / d² = mean_{i,j} cos_ij² − 1/d
                   (the batch's coordinates orthonormal: the d×d form equals the n×n one since ‖XᵀX‖_F = ‖XXᵀ‖_F and
                   tr XᵀX = n for unit rows; both from the nested cosine matrices)

R is taken over every row of the batch, with cross-device negatives over every process's (the gathered columns,
this process's `rows` not used): every process computes the same R, their mean is R, and the gather's summed
gradient (mrl.loss.dist) makes each rank's share add up to one process's ∂R/∂θ. Terms: <p>_d<d> and
<regulariser>_d<d>, unweighted.

The ranges are fixed at full width, as for a store that keeps one code per coordinate and truncates codes. The
evaluator (mrl.retrieval.quantize.stored, python -m mrl.eval --quantization) calibrates each dim's re-normalised
prefix on the corpus instead, as a store built for one dim: the same signs for binary, and for int8 / int4 a grid
scaled by each row's prefix norm.
"""

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrl.loss.device import device_constant
from mrl.loss.matryoshka import LossParts
from mrl.loss.nested import nested_cosine_matrices

QUANTISED = ("int8", "int4", "binary")  # the precisions trained for; mrl.retrieval.quantize.PRECISIONS adds float32
LARGEST_CODE = {"int8": 127, "int4": 7}  # symmetric integer codes −m..m: 255 and 15 levels
REGULARISERS = ("spread_out", "orthogonality")


def code_scales(ranges: Tensor, precision: str) -> Tensor:
    """s_c = r_c / m, the step of coordinate c's codes (ranges floored at 1e-12: a coordinate always 0 gets codes 0)."""
    return ranges.clamp_min(1e-12) / LARGEST_CODE[precision]


def integer_codes(x: Tensor, scales: Tensor, precision: str) -> Tensor:
    """clamp(round(x / s), −m, m), as floats: the codes of an int8 or int4 store."""
    m = LARGEST_CODE[precision]
    return (x / scales).round().clamp(-m, m)


def quantise(x: Tensor, ranges: Tensor | None, precision: str) -> Tensor:
    """Q(x) at `precision`, coordinate by coordinate, as a store holds x: s · codes, or the signs ±1."""
    if precision == "binary":
        return torch.where(x > 0, 1.0, -1.0).to(x.dtype)
    scales = code_scales(ranges.to(x), precision)
    return integer_codes(x, scales, precision) * scales


def straight_through(x: Tensor, ranges: Tensor | None, precision: str) -> Tensor:
    """q(x) = Q(x) + (x − sg(x)): the value of the quantised x, the gradient of x."""
    return quantise(x.detach(), ranges, precision) + (x - x.detach())


def regularisers(name: str, columns: list[Tensor], dims: list[int]) -> Tensor:
    """R_d of `name` (module docstring) for every d in `dims`: (len(dims),), averaged over the columns."""
    n = columns[0].shape[0]
    if n < 2 and name == "spread_out":  # no pair of different rows
        return columns[0].new_zeros(len(dims))
    cos = torch.stack([nested_cosine_matrices(x, x, dims) for x in columns])  # (k, n_dims, n, n)
    inverse_dims = device_constant(tuple(1 / d for d in dims), cos.device, cos.dtype)  # 1/d
    if name == "orthogonality":
        return (cos.pow(2).mean((-1, -2)) - inverse_dims).mean(0)
    pairs = n * (n - 1)
    diagonal = cos.diagonal(dim1=-2, dim2=-1)  # (k, n_dims, n)
    m1 = (cos.sum((-1, -2)) - diagonal.sum(-1)) / pairs
    m2 = (cos.pow(2).sum((-1, -2)) - diagonal.pow(2).sum(-1)) / pairs
    return (m1.pow(2) + (m2 - inverse_dims).clamp_min(0)).mean(0)


class QuantisedPrefixes(nn.Module):
    """A loss of the chain (a MatryoshkaLoss) plus the base loss on every trained prefix stored at each precision
    p of `weights` with λ_p > 0, and optionally a regulariser of the float prefixes (the module docstring):

        L = L_matryoshka + Σ_p λ_p Σ_d L_base(normalize(q_p(ê)[:, :d])) + regulariser_weight · Σ_d R_d

    nested_loss(embeddings, labels, dims=[...], **kwargs) -> (n,): the base loss at every prefix at once
    (mrl.loss.nested). ranges: (width,) per-coordinate ranges of int8 / int4, or None until `calibrate` (a buffer:
    it travels in checkpoints, so a resumed run keeps them). forward(embeddings, labels, *, dims, **kwargs) -> the
    wrapped loss's LossParts with the terms added: to the total, weighted, and as <p>_d<d> and <regulariser>_d<d>.
    """

    def __init__(self, matryoshka: nn.Module, nested_loss: Callable[..., Tensor], weights: dict[str, float],
                 width: int, ranges: Tensor | None = None, regulariser: str | None = None,
                 regulariser_weight: float = 0.0):
        super().__init__()
        check_quantisation(weights, regulariser, regulariser_weight)
        self.matryoshka, self.nested_loss = matryoshka, nested_loss
        self.weights = {p: float(weights[p]) for p in QUANTISED if weights.get(p, 0) > 0}
        self.regulariser, self.regulariser_weight = regulariser, regulariser_weight
        self.register_buffer("ranges", torch.full((width,), math.nan) if ranges is None else ranges.float().clone())
        self.ranges_checked = False

    @property
    def needs_ranges(self) -> bool:
        return any(p in LARGEST_CODE for p in self.weights)

    def calibrate(self, unit_embeddings: Tensor) -> None:
        """r_c = max_i |x_ic| over calibration rows x (N, width), unit-normalised at full width."""
        self.ranges.copy_(unit_embeddings.abs().amax(0).to(self.ranges))

    def forward(self, embeddings: list[Tensor], labels: Tensor | None = None, *, dims: Sequence[int],
                **loss_kwargs) -> LossParts:
        if self.needs_ranges and not self.ranges_checked:  # one host sync, on the first call
            if not torch.isfinite(self.ranges).all():
                raise ValueError("loss.quantisation: the int8 / int4 ranges were never calibrated (calibrate(), or "
                                 "loss.quantisation.range)")
            self.ranges_checked = True
        parts = self.matryoshka(embeddings, labels, dims=dims, **loss_kwargs)
        dims = list(dims)
        unit = [F.normalize(e.to(torch.promote_types(e.dtype, torch.float32)), dim=-1) for e in embeddings]
        for precision, weight in self.weights.items():
            stored = [straight_through(x, self.ranges, precision) for x in unit]
            losses = self.nested_loss(stored, labels, dims=dims, **loss_kwargs)  # (n,): every trained prefix
            parts = parts.plus(weight * losses.sum(), {f"{precision}_d{d}": v for d, v in zip(dims, losses.unbind())})
        if self.regulariser is not None:
            values = regularisers(self.regulariser, unit, dims)  # (n,)
            parts = parts.plus(self.regulariser_weight * values.sum(),
                               {f"{self.regulariser}_d{d}": v for d, v in zip(dims, values.unbind())})
        return parts

    def extra_repr(self) -> str:
        regulariser = f", {self.regulariser} weight {self.regulariser_weight}" if self.regulariser else ""
        return f"weights={self.weights}{regulariser}"


def precision_weights(settings) -> dict[str, float]:
    """The weight of each precision in settings with one attribute per precision (loss.quantisation), {int8: λ,
    int4: λ, binary: λ}; those above 0 are trained."""
    return {p: getattr(settings, p) for p in QUANTISED}


def check_quantisation(weights: dict[str, float], regulariser: str | None, regulariser_weight: float) -> None:
    """Raise ValueError, the message starting with the setting's name, unless every precision is known and its
    weight a finite number >= 0, and a regulariser is named with a weight > 0 (or neither)."""
    for precision, weight in weights.items():
        if precision not in QUANTISED:
            raise ValueError(f"{precision}: not a precision; expected one of {' | '.join(QUANTISED)}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{precision}: the weight must be a finite number >= 0, got {weight}")
    if regulariser is not None and regulariser not in REGULARISERS:
        raise ValueError(f"regulariser: expected {' | '.join(REGULARISERS)}, got {regulariser!r}")
    if (regulariser is None) != (regulariser_weight == 0) or not math.isfinite(regulariser_weight) \
            or regulariser_weight < 0:
        raise ValueError(f"regulariser_weight: must be > 0 with a regulariser and 0 without one, got "
                         f"{regulariser_weight} with {regulariser}")
