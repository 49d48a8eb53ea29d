"""2D Matryoshka (Li et al., 2024, "2D Matryoshka Sentence Embeddings"): nested dims AND nested depth."""

import random
from collections.abc import Sequence

from torch import Tensor, nn

from mrl.cli import naming
from mrl.loss.matryoshka import LossParts
from mrl.loss.nested import contrastive_scores_nested
from mrl.loss.variants import kl_to_teacher


class Matryoshka2dLoss(nn.Module):
    """Takes the columns of `Encoder(features, all_layers=True)`, each (B, L, D), where [:, l-1] is the
    embedding pooled from the first l layers. Each step trains the last layer and `layers_per_step` earlier
    layers S, drawn at random from 1..L-1, all at the same dims (those handed to forward):

        L_2D = L_M(e^L) + Σ_{l ∈ S} [ layer_weight · L_M(e^l) + kl_weight · KL( P^L ‖ P^l ) ]

    L_M is the Matryoshka loss it wraps; P^l_i = softmax_j( cos(q^l_i, c^l_j) / τ ), each anchor's
    distribution over the batch's candidates (the other columns), at full width D (the contrastive loss's scores,
    mrl.loss.nested.contrastive_scores_nested, whatever the base loss); the last layer's P^L is the teacher,
    detached (mrl.loss.variants.kl_to_teacher). Nothing here touches the model, so it runs under DDP unchanged
    (the layers come from one forward's hidden states). forward(embeddings, labels, *, dims) -> the last layer's
    LossParts (its per_dim and terms) with each earlier layer's added: to the total, weighted, and as terms
    layer<l> (its L_M) and kl_layer<l>, unweighted.
    """

    def __init__(self, matryoshka: nn.Module, layers_per_step: int = 1, layer_weight: float = 1.0,
                 kl_weight: float = 1.0, kl_temperature: float = 0.3):
        super().__init__()
        self.matryoshka = matryoshka
        self.layers_per_step, self.layer_weight = layers_per_step, layer_weight
        self.kl_weight, self.kl_temperature = kl_weight, kl_temperature

    def forward(self, embeddings: list[Tensor], labels: Tensor | None = None, *, dims: Sequence[int],
                rows: Tensor | None = None, **loss_kwargs) -> LossParts:
        n_layers, width = embeddings[0].shape[1:]
        with naming("layers_per_step"):
            check_layers_per_step(self.layers_per_step, n_layers)
        if rows is not None:
            loss_kwargs["rows"] = rows
        final = [e[:, -1] for e in embeddings]
        parts = self.matryoshka(final, labels, dims=dims, **loss_kwargs)
        teacher = contrastive_scores_nested(final, dims=[width], rows=rows)[0]  # (b, C)
        for layer in sorted(random.sample(range(1, n_layers), self.layers_per_step)):
            columns = [e[:, layer - 1] for e in embeddings]
            layer_loss = self.matryoshka(columns, labels, dims=dims, **loss_kwargs).total
            kl = kl_to_teacher(teacher, contrastive_scores_nested(columns, dims=[width], rows=rows)[0],
                               self.kl_temperature)
            parts = parts.plus(self.layer_weight * layer_loss, {f"layer{layer}": layer_loss})
            parts = parts.plus(self.kl_weight * kl, {f"kl_layer{layer}": kl})
        return parts

    def extra_repr(self) -> str:
        return (f"layers_per_step={self.layers_per_step}, layer_weight={self.layer_weight}, "
                f"kl_weight={self.kl_weight}, kl_temperature={self.kl_temperature}")


def check_layers_per_step(layers_per_step: int, n_layers: int) -> None:
    """2D Matryoshka draws earlier layers from 1..L-1: at least one, and fewer than L (the caller names the field)."""
    if not 1 <= layers_per_step < n_layers:
        raise ValueError(f"must be in 1..{n_layers - 1} for a {n_layers}-layer model, got {layers_per_step}")
