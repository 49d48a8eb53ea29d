"""Beyond plain MRL: pieces that compose with mrl.loss.matryoshka.MatryoshkaLoss, each off by default.

- Dim weights by a rule (`dim_weights`) or learned (`LearnedWeightsMatryoshkaLoss`: uncertainty weighting).
- A few dims per step (`DimSampler`: drawn at random or in turn; its position travels in checkpoints).
- Prefix self-distillation (`PrefixDistillation`): each prefix's in-batch similarity distribution is pulled
  toward the full width's, through `kl_to_teacher`, the KL that 2D Matryoshka (mrl.loss.two_d) uses too.
- Distillation from a teacher model into every prefix (`TeacherDistillation`): the same KL toward the
  teacher's distribution, and where the widths match an MSE toward the teacher's embeddings, truncated alike.
Each is checked against a float64 formula of its own in tests/test_quality_options.py.
"""

import math
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrl.loss.device import device_constant
from mrl.loss.matryoshka import LossParts, MatryoshkaLoss

# Fixed rules for the weight of each dim d of a model of width D; rescaled so that the weights average 1 (the
# total loss then has the scale of uniform weights, and one learning rate serves every rule)
DIM_WEIGHT_RULES = {
    "uniform": lambda d, width: 1.0,  # the reference (MRL, sentence-transformers)
    "proportional": lambda d, width: d / width,  # each dim counts by its share of the width
    "inverse_sqrt": lambda d, width: (width / d) ** 0.5,  # decays with the dim: small prefixes count more
    "inverse": lambda d, width: width / d,  # decays faster: each halving of d doubles its weight
}


def dim_weights(rule: str, dims: Sequence[int]) -> list[float]:
    """The weights of one of DIM_WEIGHT_RULES for `dims`, in dims' order, averaging 1."""
    raw = [DIM_WEIGHT_RULES[rule](d, max(dims)) for d in dims]
    return [w * len(raw) / sum(raw) for w in raw]


class LearnedWeightsMatryoshkaLoss(MatryoshkaLoss):
    """Uncertainty weighting (Kendall et al., 2018): one parameter s_d = log σ_d² per dim, trained with the
    model (put `parameters()` in the optimiser), in place of fixed weights:

        L = Σ_d exp(−s_d) · L_d + s_d          (each s_d settles where exp(s_d) = L_d)
    """

    def __init__(self, base_loss: Callable[..., Tensor], dims: Sequence[int],
                 nested_loss: Callable[..., Tensor] | None = None):
        super().__init__(base_loss, dims, nested_loss=nested_loss)
        self.log_variances = nn.Parameter(torch.zeros(len(self.dims)))  # s_d, in self.dims' order

    def weigh(self, losses: Tensor, dims: Sequence[int]) -> Tensor:
        rows = device_constant(tuple(self.dims.index(d) for d in dims), self.log_variances.device, torch.long)
        s = self.log_variances[rows].to(losses.device)
        return (torch.exp(-s) * losses + s).sum()

    def current_weights(self) -> dict[int, float]:
        """exp(−s_d) of each dim, now."""
        return dict(zip(self.dims, torch.exp(-self.log_variances.detach()).tolist()))

    def extra_repr(self) -> str:
        return f"dims={self.dims}, weights=learned"


class DimSampler:
    """The dims one step trains, when not all: k of them per call, drawn at random (Python's `random`, which
    the training loop seeds and checkpoints) or in turn ("cyclic": the next k, wrapping around, so every dim
    is trained equally often). always_full=True makes the largest dim one of the k, every call. Returns the
    dims largest first; its state (the calls so far) goes into checkpoints, so a resumed run continues the cycle.
    """

    def __init__(self, dims: Sequence[int], k: int, schedule: str = "random", always_full: bool = False):
        check_dim_sampling(len(dims), k, schedule, always_full)
        self.dims, self.k, self.schedule, self.always_full = sorted(dims, reverse=True), k, schedule, always_full
        self.calls = 0

    def __call__(self) -> list[int]:
        fixed = [0] if self.always_full else []
        pool = list(range(len(fixed), len(self.dims)))
        k = self.k - len(fixed)
        if self.schedule == "random":
            drawn = random.sample(pool, k)
        else:  # cyclic: the next k of the pool, wrapping around
            drawn = [pool[(self.calls * k + j) % len(pool)] for j in range(k)]
        self.calls += 1
        return [self.dims[i] for i in sorted(fixed + drawn)]

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]

    def __repr__(self) -> str:
        return (f"DimSampler({self.k} of {self.dims} per step, {self.schedule}"
                + (", always the largest)" if self.always_full else ")"))


def check_dim_sampling(n_dims: int, k: int | None, schedule: str, always_full: bool) -> None:
    """Raise ValueError, the message starting with the setting's name (dims_per_step, schedule or always_full),
    unless k of n_dims dims can be drawn per step by `schedule`."""
    if k is not None and not 1 <= k <= n_dims:
        raise ValueError(f"dims_per_step: must be between 1 and the number of dims ({n_dims}), got {k}")
    if schedule not in ("random", "cyclic"):
        raise ValueError(f"schedule: expected random | cyclic, got {schedule!r}")
    if always_full and k == 1:
        raise ValueError("always_full: with dims_per_step=1 only the largest dim would train (no Matryoshka); set "
                         "dims_per_step >= 2")


def kl_to_teacher(teacher: Tensor, student: Tensor, temperature: float) -> Tensor:
    """KL(P_teacher ‖ P_student) of similarity distributions, the teacher detached; teacher (R, C) scores,
    student (..., R, C) -> (...). Each row is a distribution over its C candidates at temperature τ:

        P_r = softmax_c( S_rc / τ ),    KL = 1/R Σ_r Σ_c P^teacher_rc · (log P^teacher_rc − log P^student_rc)
    """
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_teacher = F.log_softmax(teacher.detach().to(dtype) / temperature, dim=-1)
    log_student = F.log_softmax(student.to(dtype) / temperature, dim=-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean(-1)


class PrefixDistillation(nn.Module):
    """A Matryoshka loss plus prefix self-distillation: each trained prefix d below the embeddings' full width
    D is pulled toward the full embedding's similarity structure, the teacher detached:

        L = L_matryoshka + weight · Σ_{d < D} KL( P^D ‖ P^d )        (kl_to_teacher)

    where P^d is the softmax at `temperature` of the batch's scores at width d, given by
    scores(embeddings, dims=[...]) -> (n, R, C) (mrl.loss.nested.NESTED_SCORES: each anchor's cosines to every
    candidate for the contrastive loss, the pair cosines of the batch for CoSENT). The teacher is the
    embeddings' full width D, also when the largest trained dim is smaller. forward(embeddings, labels, *, dims)
    -> the Matryoshka loss's LossParts with the KL added: to the total, and as terms distill_d<d>, unweighted.
    """

    def __init__(self, matryoshka: MatryoshkaLoss, scores: Callable[..., Tensor], weight: float,
                 temperature: float = 0.05):
        super().__init__()
        check_distillation(temperature, weight=weight)
        self.matryoshka, self.scores, self.weight, self.temperature = matryoshka, scores, weight, temperature

    def forward(self, embeddings: list[Tensor], labels: Tensor | None = None, *, dims: Sequence[int],
                **loss_kwargs) -> LossParts:
        parts = self.matryoshka(embeddings, labels, dims=dims, **loss_kwargs)
        width = embeddings[0].shape[-1]
        students = [d for d in dims if d < width]
        if students:
            scores = self.scores(embeddings, dims=[width] + students, **loss_kwargs)  # (1 + n, R, C)
            kl = kl_to_teacher(scores[0], scores[1:], self.temperature)  # (n,)
            parts = parts.plus(self.weight * kl.sum(), {f"distill_d{d}": v for d, v in zip(students, kl.unbind())})
        return parts

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}"


def check_distillation(temperature: float, **weights: float) -> None:
    """Raise ValueError, naming the weight, unless each weight is >= 0 and temperature > 0 (all finite)."""
    for name, weight in weights.items():
        if not (math.isfinite(weight) and weight >= 0 and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"{name} must be >= 0 and temperature > 0, got {weight} and {temperature}")


class TeacherDistillation(nn.Module):
    """A Matryoshka loss plus distillation from a teacher's embeddings t (one (B, D_t) tensor per column, given
    to forward as `teacher`) into every trained prefix d of the student's e:

        L = L_matryoshka + kl_weight · Σ_d KL( P^teacher ‖ P^d ) + mse_weight · Σ_d MSE_d
        MSE_d = 1/(k·B) Σ_columns Σ_rows ‖ normalize(e[:, :d]) − normalize(t[:, :d]) ‖²

    P^teacher is the softmax at `temperature` of the teacher's in-batch scores at its full width, P^d the
    student's at d (the loss's `scores`, as PrefixDistillation; kl_to_teacher, teacher detached). The MSE needs
    the teacher as wide as the student (D_t = D): the teacher is truncated the same way as the student.
    forward(embeddings, labels, *, dims, teacher) -> the wrapped loss's LossParts with both terms added: to the
    total, and as terms teacher_kl_d<d> and teacher_mse_d<d>, unweighted, for each trained d.
    """

    def __init__(self, matryoshka: nn.Module, scores: Callable[..., Tensor], kl_weight: float = 1.0,
                 temperature: float = 0.05, mse_weight: float = 0.0):
        super().__init__()
        check_distillation(temperature, kl_weight=kl_weight, mse_weight=mse_weight)
        self.matryoshka, self.scores = matryoshka, scores
        self.kl_weight, self.temperature, self.mse_weight = kl_weight, temperature, mse_weight

    def forward(self, embeddings: list[Tensor], labels: Tensor | None = None, *, dims: Sequence[int],
                teacher: list[Tensor] | None = None, **loss_kwargs) -> LossParts:
        parts = self.matryoshka(embeddings, labels, dims=dims, **loss_kwargs)
        if teacher is None:  # a batch of a mixture's dataset that brings no teacher embeddings: not distilled
            return parts
        if self.kl_weight > 0:
            teacher_scores = self.scores(teacher, dims=[teacher[0].shape[-1]], **loss_kwargs)[0]  # (R, C)
            kl = kl_to_teacher(teacher_scores, self.scores(embeddings, dims=dims, **loss_kwargs), self.temperature)
            parts = parts.plus(self.kl_weight * kl.sum(), {f"teacher_kl_d{d}": v for d, v in zip(dims, kl.unbind())})
        if self.mse_weight > 0:
            if teacher[0].shape[-1] != embeddings[0].shape[-1]:
                raise ValueError(f"loss.teacher.mse_weight: the teacher's width {teacher[0].shape[-1]} is not the "
                                 f"student's {embeddings[0].shape[-1]}")
            mse = torch.stack([torch.stack([(F.normalize(e[:, :d], dim=-1) - F.normalize(t[:, :d].to(e.dtype), dim=-1))
                                            .pow(2).sum(-1).mean() for e, t in zip(embeddings, teacher)]).mean()
                               for d in dims])  # (n,)
            parts = parts.plus(self.mse_weight * mse.sum(),
                               {f"teacher_mse_d{d}": v for d, v in zip(dims, mse.unbind())})
        return parts

    def extra_repr(self) -> str:
        return f"kl_weight={self.kl_weight}, temperature={self.temperature}, mse_weight={self.mse_weight}"
