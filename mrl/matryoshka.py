"""Matryoshka Representation Learning (Kusupati et al., NeurIPS 2022) as a loss that wraps a loss."""

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import device_constant


def check_dims(dims: Sequence[int], weights: Sequence[float] | str | None = None, n_dims_per_step: int | None = None,
               embedding_dim: int | None = None, field: str = "dims", always_full: bool = False,
               schedule: str = "random", distill_weight: float = 0.0, distill_temperature: float = 0.05) -> None:
    """Raise ValueError, naming `field`, if the nested dims (and how they are trained) cannot be trained."""
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
    if isinstance(weights, str):
        if weights not in DIM_WEIGHT_RULES and weights != "learned":
            raise ValueError(f"{prefix}dim_weights: expected a list of numbers or one of "
                             f"{sorted(DIM_WEIGHT_RULES) + ['learned']}, got {weights!r}")
    elif weights is not None:
        if len(weights) != len(dims):
            raise ValueError(f"{prefix}dim_weights: got {len(weights)} weights for {len(dims)} dims {list(dims)}")
        if any(not isinstance(w, (int, float)) or w < 0 for w in weights):
            raise ValueError(f"{prefix}dim_weights: every weight must be a number >= 0, got {list(weights)}")
    if n_dims_per_step is not None and not 1 <= n_dims_per_step <= len(dims):
        raise ValueError(f"{prefix}n_dims_per_step: must be between 1 and len(dims)={len(dims)}, got {n_dims_per_step}")
    if always_full and n_dims_per_step == 1:
        raise ValueError(f"{prefix}always_full_dim: with {prefix}n_dims_per_step=1 only the largest dim would train "
                         f"(no Matryoshka); set {prefix}n_dims_per_step >= 2")
    if schedule not in ("random", "cyclic"):
        raise ValueError(f"{prefix}dim_schedule: expected random | cyclic, got {schedule!r}")
    if distill_weight < 0 or distill_temperature <= 0:
        raise ValueError(f"{prefix}distill_weight must be >= 0 and {prefix}distill_temperature > 0, "
                         f"got {distill_weight} and {distill_temperature}")


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


def prefix_distillation(scores: Tensor, temperature: float) -> Tensor:
    """KL from the full embedding's similarity distribution to each prefix's: (n,) for scores (1 + n, R, C).

    scores[0] are the full width's scores (the teacher, detached here), scores[k] the k-th prefix's, over the
    same R rows × C candidates. Each row is a distribution over its candidates at temperature τ:

        P^d_r = softmax_c( S^d_rc / τ ),    KL_d = 1/R Σ_r Σ_c P^full_rc · (log P^full_rc − log P^d_rc)
    """
    log_p = F.log_softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)) / temperature, dim=-1)
    teacher, students = log_p[0].detach(), log_p[1:]
    return (teacher.exp() * (teacher - students)).sum(-1).mean(-1)


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
    first, with their weights). forward returns (total, per_dim): the total, and each trained dim's unweighted
    loss, detached, for logging. The base loss is any callable base_loss(embeddings, labels) -> scalar, e.g. a
    function of `mrl.losses` with its keyword arguments bound by functools.partial. Extra keyword arguments of
    forward (e.g. `rows` for cross-device negatives) go to the loss.

    nested_loss, optional: the same loss for many dims at once, nested_loss(embeddings, labels, dims=[...])
    -> (len(dims),) (mrl.losses.NESTED_LOSSES: prefix sums give every dim's cosines for about the cost of
    one full-width matmul). It must equal the base loss on each prefix; it is used instead of the loop.

    Options beyond plain MRL (all off by default, which is the reference):

    weights: a list (one per dim), a rule of DIM_WEIGHT_RULES ("uniform", "proportional", "inverse_sqrt",
        "inverse"),
        or "learned": uncertainty weighting (Kendall et al., 2018), one parameter s_d = log σ_d² per dim,
        trained with the model (put `parameters()` in the optimiser):
            L = Σ_d exp(−s_d) · L_d + s_d          (each s_d settles where exp(s_d) = L_d)
    n_dims_per_step=k: train k of the dims per call; schedule "random" draws them (Python's `random`, which
        the training loop seeds and checkpoints), "cyclic" walks through the dims in order, k at a time, so
        every dim is trained equally often; always_full=True makes the largest dim one of the k, every call.
        The call count is part of state_dict, so a resumed run continues the cycle. A caller that scores
        several sets of embeddings per step with the same dims (Matryoshka2dLoss: one per layer) passes
        `chosen=loss.last_chosen` after the first call, which leaves the schedule where it is.
    distill_weight > 0: prefix self-distillation. Each trained prefix d below the embeddings' full width D
        is pulled toward the full embedding's similarity structure (at the embeddings' width D, also when the
        largest of `dims` is smaller), the teacher detached:
            L += distill_weight · Σ_{d < D} KL( P^D ‖ P^d )        (prefix_distillation)
        where P^d is the softmax at `distill_temperature` of the batch's scores at dim d, given by
        nested_scores(embeddings, dims=[...]) -> (n, R, C) (mrl.losses.NESTED_SCORES: each anchor's cosines
        to all candidates for the contrastive loss, the pair cosines of the batch for CoSENT).
    """

    def __init__(self, base_loss: Callable[..., Tensor], dims: Sequence[int],
                 weights: Sequence[float] | str | None = None, n_dims_per_step: int | None = None,
                 nested_loss: Callable[..., Tensor] | None = None, schedule: str = "random",
                 always_full: bool = False, distill_weight: float = 0.0, distill_temperature: float = 0.05,
                 nested_scores: Callable[..., Tensor] | None = None):
        super().__init__()
        check_dims(dims, weights, n_dims_per_step, always_full=always_full, schedule=schedule,
                   distill_weight=distill_weight, distill_temperature=distill_temperature)
        if distill_weight > 0 and nested_scores is None:
            raise ValueError("distill_weight > 0 needs nested_scores (see mrl.losses.NESTED_SCORES)")
        self.learned = weights == "learned"
        if weights is None or self.learned:
            weights = [1.0] * len(dims)
        elif isinstance(weights, str):
            weights = dim_weights(weights, dims)
        by_size = sorted(zip(dims, weights), key=lambda dw: -dw[0])
        self.base_loss = base_loss
        self.dims = [d for d, _ in by_size]
        self.weights = [float(w) for _, w in by_size]
        self.n_dims_per_step, self.schedule, self.always_full = n_dims_per_step, schedule, always_full
        self.nested_loss, self.nested_scores = nested_loss, nested_scores
        self.distill_weight, self.distill_temperature = distill_weight, distill_temperature
        self.log_variances = nn.Parameter(torch.zeros(len(dims))) if self.learned else None  # s_d, by self.dims
        self.calls = 0  # dim draws so far: where the cyclic schedule stands
        self.last_chosen: list[int] | None = None  # the dims of the last call

    def choose_dims(self) -> list[int]:
        """Indices (into self.dims) of the dims this call trains, largest dim first."""
        if self.n_dims_per_step is None:
            return list(range(len(self.dims)))
        fixed = [0] if self.always_full else []
        pool = list(range(len(fixed), len(self.dims)))
        k = self.n_dims_per_step - len(fixed)
        if self.schedule == "random":
            drawn = random.sample(pool, k)
        else:  # cyclic: the next k of the pool, wrapping around
            drawn = [pool[(self.calls * k + j) % len(pool)] for j in range(k)]
        return sorted(fixed + drawn)

    def forward(self, embeddings: list[Tensor], labels: Tensor | None = None, chosen: list[int] | None = None,
                **loss_kwargs) -> tuple[Tensor, dict]:
        """chosen: indices of the dims to train (as choose_dims gives them); default: the schedule's next."""
        width = embeddings[0].shape[-1]
        if self.dims[0] > width:
            raise ValueError(f"dims: dim {self.dims[0]} is larger than the embeddings' width {width}")
        if chosen is None:
            chosen = self.choose_dims()
            self.calls += 1
        self.last_chosen = chosen
        dims = [self.dims[i] for i in chosen]
        if self.nested_loss is not None:
            losses = self.nested_loss(embeddings, labels, dims=dims, **loss_kwargs)  # (n,)
        else:
            losses = torch.stack([self.base_loss([F.normalize(e[:, :d], dim=-1) for e in embeddings], labels,
                                                 **loss_kwargs) for d in dims])
        if self.learned:
            chosen_rows = device_constant(tuple(chosen), self.log_variances.device, torch.long)
            s = self.log_variances[chosen_rows].to(losses.device)
            total = (torch.exp(-s) * losses + s).sum()
        else:
            weights = device_constant(tuple(self.weights[i] for i in chosen), losses.device, losses.dtype)
            total = (losses * weights).sum()
        per_dim = dict(zip(dims, losses.detach().unbind()))
        students = [d for d in dims if d < width]
        if self.distill_weight > 0 and students:
            scores = self.nested_scores(embeddings, dims=[width] + students, **loss_kwargs)  # (1 + n, R, C)
            kl = prefix_distillation(scores, self.distill_temperature)
            total = total + self.distill_weight * kl.sum()
            per_dim.update({f"distill_d{d}": v for d, v in zip(students, kl.detach().unbind())})
        return total, per_dim

    def current_weights(self) -> dict[int, float]:
        """Each dim's weight now: exp(−s_d) when learned, else the fixed weight."""
        if self.learned:
            return dict(zip(self.dims, torch.exp(-self.log_variances.detach()).tolist()))
        return dict(zip(self.dims, self.weights))

    def get_extra_state(self) -> dict:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict) -> None:
        self.calls = state["calls"]

    def extra_repr(self) -> str:
        weights = "learned" if self.learned else self.weights
        text = f"dims={self.dims}, weights={weights}, n_dims_per_step={self.n_dims_per_step}"
        if self.n_dims_per_step is not None:
            text += f", schedule={self.schedule}, always_full={self.always_full}"
        if self.distill_weight > 0:
            text += f", distill_weight={self.distill_weight}, distill_temperature={self.distill_temperature}"
        return text


class Matryoshka2dLoss(nn.Module):
    """2D Matryoshka (Li et al., 2024, "2D Matryoshka Sentence Embeddings"): nested dims AND nested depth.

    Takes the columns of `Encoder(features, all_layers=True)`, each (B, L, D), where [:, l-1] is the embedding
    pooled from the first l layers. Each step trains the last layer and n_layers_per_step earlier layers S,
    drawn at random from 1..L-1, all at the same dims (with n_dims_per_step, those drawn for the last layer):

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
            layer_loss, _ = self.matryoshka(columns, labels, chosen=self.matryoshka.last_chosen, **loss_kwargs)
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
