"""The training objective of a config's `loss` section: one callable from a step's embeddings to its loss.

    base loss (mrl.loss.base, named by loss.name)
      -> MatryoshkaLoss over loss.dims, every dim from one batched computation (mrl.loss.nested), weights by
         loss.dim_weights (a list, a rule, or learned: mrl.loss.variants)
      -> + every prefix stored in int8 / int4 / binary, and a regulariser (loss.quantisation: mrl.loss.quantisation)
      -> + prefix self-distillation (loss.distill) -> + distillation from a teacher (loss.teacher)
      -> 2D Matryoshka over layers (loss.two_d)
with the dims of each step drawn by a DimSampler (loss.dim_sampling), every process's embeddings gathered
first with cross-device negatives (mrl.loss.dist), and likely false negatives left out of each anchor's
denominator with loss.false_negative_margin (mrl.loss.base.false_negatives).
"""

from dataclasses import replace

import torch
from torch import Tensor

from mrl.loss.dist import gather_columns
from mrl.loss.base import false_negatives
from mrl.loss.matryoshka import LossParts, MatryoshkaLoss
from mrl.loss.nested import NESTED_SCORES, losses_for
from mrl.loss.quantisation import QuantisedPrefixes, precision_weights
from mrl.loss.two_d import Matryoshka2dLoss
from mrl.loss.variants import (DimSampler, LearnedWeightsMatryoshkaLoss, PrefixDistillation, TeacherDistillation,
                       dim_weights)


class Objective:
    """objective(embeddings, labels) -> LossParts (mrl.loss.matryoshka: the total, each trained dim's loss, each
    option's term), for this process's embeddings (one (B, D) tensor per text column, or (B, L, D) with every
    layer's for 2D). Each call decides the dims the step trains, the DimSampler's draw or every dim of the
    Matryoshka loss, and hands them down the chain. loss_config: mrl.run.config.LossConfig; width: the model's
    embedding size (the baseline trains that dim alone); n_processes: for the cross-device default.

    Attributes: `loss` (the nn.Module to checkpoint and whose parameters, if any, to train), `matryoshka` (the
    Matryoshka loss inside it: its current_weights), `dim_sampler` (None, or a DimSampler to checkpoint),
    `quantised` (None, or the QuantisedPrefixes inside it: its ranges to calibrate before training).
    """

    def __init__(self, loss_config, width: int, n_processes: int = 1):
        base_loss, nested_loss = losses_for(loss_config.name, loss_config.scale, loss_config.symmetric)
        dims = loss_config.dims if loss_config.matryoshka else [width]  # the baseline: the full width only
        rule = loss_config.dim_weights
        if rule == "learned":
            self.matryoshka = LearnedWeightsMatryoshkaLoss(base_loss, dims, nested_loss)
        else:
            weights = dim_weights(rule, dims) if isinstance(rule, str) else rule
            self.matryoshka = MatryoshkaLoss(base_loss, dims, weights, nested_loss)
        self.loss, distill, two_d = self.matryoshka, loss_config.distill, loss_config.two_d
        self.quantised, quantisation = None, loss_config.quantisation
        precisions = precision_weights(quantisation)
        if any(precisions.values()) or quantisation.regulariser:
            ranges = None if quantisation.range is None else torch.full((width,), quantisation.range)
            self.loss = self.quantised = QuantisedPrefixes(self.loss, nested_loss, precisions, width, ranges,
                                                           quantisation.regulariser, quantisation.regulariser_weight)
        if distill.weight > 0:
            self.loss = PrefixDistillation(self.loss, NESTED_SCORES[loss_config.name], distill.weight,
                                           distill.temperature)
        teacher = loss_config.teacher
        if teacher.model is not None:
            self.loss = TeacherDistillation(self.loss, NESTED_SCORES[loss_config.name], teacher.kl_weight,
                                            teacher.temperature, teacher.mse_weight)
        if two_d.enabled:
            self.loss = Matryoshka2dLoss(self.loss, two_d.layers_per_step, two_d.layer_weight, two_d.kl_weight,
                                         two_d.kl_temperature)
        sampling = loss_config.dim_sampling
        self.dim_sampler = (DimSampler(dims, sampling.dims_per_step, sampling.schedule, sampling.always_full)
                            if sampling.dims_per_step else None)
        contrastive = loss_config.name == "contrastive"  # the options below are the contrastive loss's (a
        # mixture may hold a CoSENT dataset beside contrastive ones: its objective leaves them out)
        self.false_negative_margin = loss_config.false_negative_margin if contrastive else None
        # cross-device negatives: loss.cross_device, or by default whenever a contrastive run has several processes
        self.cross_device = contrastive and (loss_config.cross_device if loss_config.cross_device is not None
                                             else n_processes > 1)

    def __call__(self, embeddings: list[Tensor], labels: Tensor | None = None,
                 teacher: list[Tensor] | None = None) -> LossParts:
        """teacher: the teacher's embeddings of the same texts (loss.teacher), one tensor per column."""
        dims = self.dim_sampler() if self.dim_sampler else self.matryoshka.dims  # largest first, as both give them
        rows = None
        if self.cross_device:  # each anchor against the candidates of every process
            embeddings, rows = gather_columns(embeddings)
            teacher = None if teacher is None else gather_columns(teacher)[0]
        kwargs = {} if rows is None else {"rows": rows}
        if teacher is not None:
            kwargs["teacher"] = teacher
        if self.false_negative_margin is not None:  # one mask, at full width (2D: the last layer), for every prefix
            full = [e[:, -1] if e.dim() == 3 else e for e in embeddings]
            kwargs["exclude"] = false_negatives(full, self.false_negative_margin, rows)
        return self.loss(embeddings, labels, dims=dims, **kwargs)

    def __repr__(self) -> str:
        return (f"{self.loss}" + (f", {self.dim_sampler}" if self.dim_sampler else "")
                + (", negatives from every process" if self.cross_device else ""))

    def checkpointed(self) -> list:
        """What a checkpoint holds of this objective: its loss (learned dim weights, if any) and its dim sampler."""
        return [x for x in (self.loss, self.dim_sampler) if x is not None]


def dataset_objectives(loss_config, losses: list[str], width: int, n_processes: int = 1) -> list[Objective]:
    """The objective of each training dataset, given each one's loss (a mixture may train CoSENT on scored pairs
    and the contrastive loss on triplets): one Objective per loss, shared by the datasets that use it."""
    by_loss = {name: Objective(replace(loss_config, name=name), width, n_processes) for name in dict.fromkeys(losses)}
    return [by_loss[name] for name in losses]
