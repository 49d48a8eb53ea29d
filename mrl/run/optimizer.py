"""The optimiser's parameter groups and learning-rate schedule, and the learned dim weights' gradients.

AdamW as BERT trains it: weight decay on the weight matrices, none on biases and LayerNorm weights; the learned
dim weights (loss.dim_weights=learned) in a group of their own, at loss.dim_weight_lr, on the same schedule.
"""

import math

import torch
from torch import nn


def param_groups(model: nn.Module, loss_parameters: list, weight_decay: float, dim_weight_lr: float) -> list[dict]:
    """The model's trainable parameters in two groups (with and without weight decay) and the loss's own."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
            {"params": loss_parameters, "weight_decay": 0.0, "lr": dim_weight_lr}]


def linear_schedule(optimizer: torch.optim.Optimizer, train, batches_per_epoch: int, n_processes: int):
    """(scheduler, total optimiser steps T): the learning rate times

        f(t) = t / W  for t < W,   then  (T − t) / (T − W)  down to 0,   W = ⌈warmup_ratio · T⌉

    (warm-up rounded up, as the reference trainer does; the same function as transformers'
    get_linear_schedule_with_warmup, written here because importing that loads accelerate). A prepared
    scheduler steps once per process per step, so t, W and T count process steps: n_processes per step."""
    steps_per_epoch = math.ceil(batches_per_epoch / (n_processes * train.grad_accum))
    total_steps = min(train.epochs * steps_per_epoch, train.max_steps or math.inf)
    warmup, total = math.ceil(train.warmup_ratio * total_steps) * n_processes, total_steps * n_processes

    def factor(t: int) -> float:
        if t < warmup:
            return float(t) / float(max(1, warmup))
        return max(0.0, float(total - t) / float(max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), total_steps


def reduce_grads(parameters: list, accelerator) -> None:
    """Average the loss's own parameters' gradients over the processes: they are not inside DDP's model, which
    does this for the model's. A parameter of another dataset's loss, unused this step, keeps its None."""
    for p in parameters if accelerator.num_processes > 1 else []:
        p.grad = None if p.grad is None else accelerator.reduce(p.grad, "mean")
