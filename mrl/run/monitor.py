"""What the training loop watches, without a host sync per step: each step's losses (the total, each dim's,
each option's term) and its gradient norm stay on the device until a check.

check() looks at every step since the last check (one host sync) and stops the run at the first whose loss
or gradient norm is not finite, naming the step and the losses that went non-finite: nothing after it is
saved. train.py checks every step on a CPU (where a sync costs nothing) and on a GPU at each log interval and
before anything is evaluated or saved. averages() gives the mean of each loss since the last log.
"""

import math
from collections import Counter

import torch
from torch import Tensor

from mrl.loss.matryoshka import LossParts


class NonFiniteLoss(ArithmeticError):
    """The loss or the gradient norm of a step was NaN or infinite."""


class StepMonitor:
    def __init__(self):
        self.current: list[tuple[dict[str, Tensor], list[int]]] = []  # the step's micro-batches: (values, dims)
        self.unchecked: list[tuple[int, dict[str, Tensor]]] = []  # (step, its values), since the last check
        self.sums: dict = {}  # per key: (sum, count) of its values since the last log, on the device
        self.dims_trained = Counter()  # optimiser steps that trained each dim

    def add(self, parts: LossParts, source: str | None = None) -> None:
        """One micro-batch's losses, by name: its total (loss), each trained dim's (d<dim>) and each term; with
        `source` (a mixture's dataset), each is also averaged apart for that dataset, as <source>/<name>."""
        values = {"loss": parts.total.detach(), **{f"d{d}": v for d, v in parts.per_dim.items()}, **parts.terms}
        self.current.append((values, list(parts.per_dim)))
        logged = values if source is None else {**values, **{f"{source}/{k}": v for k, v in values.items()}}
        for key, value in logged.items():  # a dim or term drawn on some steps only averages its own steps
            total, count = self.sums.get(key, (0.0, 0))
            self.sums[key] = (total + value, count + 1)

    def end_step(self, step: int, grad_norm: Tensor | None) -> list[int]:
        """Close optimiser step `step`; returns the dims it trained, largest first."""
        values = {key + (f" (micro-batch {i + 1})" if len(self.current) > 1 else ""): value
                  for i, (named, _) in enumerate(self.current) for key, value in named.items()}
        if grad_norm is not None:
            values["gradient norm"] = grad_norm
        self.unchecked.append((step, values))
        dims = sorted({d for _, trained in self.current for d in trained}, reverse=True)
        self.dims_trained.update(dims)
        self.current = []
        return dims

    def check(self) -> None:
        """Raise NonFiniteLoss at the first unchecked step with a non-finite loss or gradient norm."""
        if not self.unchecked:
            return
        finite = torch.stack([torch.stack([torch.as_tensor(v).float() for v in values.values()]).isfinite().all()
                              for _, values in self.unchecked]).tolist()  # the host sync
        bad = next((i for i, ok in enumerate(finite) if not ok), None)
        if bad is not None:
            step, values = self.unchecked[bad]
            named = ", ".join(f"{key} {float(v):g}" for key, v in values.items() if not math.isfinite(float(v)))
            raise NonFiniteLoss(f"training diverged at step {step}: {named}. Stopped; nothing of this step or after "
                                f"was saved. Lower train.lr, or look for bad rows in the training data")
        self.unchecked = []

    def averages(self) -> dict[str, float]:
        """Each loss's mean since the last call, as tracker tags: train/loss, train/loss/d<dim>, train/loss/<term>."""
        logs = {"train/loss" if key == "loss" else f"train/loss/{key}": (total / count).item()
                for key, (total, count) in self.sums.items()}  # .item(): one host sync per log interval
        self.sums = {}
        return logs
