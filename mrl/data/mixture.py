"""Training on a mixture of datasets, each batch from one of them (nomic's contrastors: "to discourage
shortcuts": a batch of one source cannot be solved by telling sources apart).

    data:
      train:
        nli:  {path: sentence-transformers/all-nli, name: triplet, split: train, weight: 1}
        sts:  {path: sentence-transformers/stsb, split: train, loss: cosent, weight: 2}
      mixture: proportional        # or round_robin

Each named dataset is a dataset spec (mrl.data.load_table) plus three keys: `loss` (its loss, default
loss.name: CoSENT for scored pairs, contrastive for pairs and triplets), `prompts` ({column: prompt}, as
data.prompts) and `weight`. An epoch takes weight × a dataset's batches from it (its own no-duplicates
batches, reshuffled on every pass; a fraction takes the first part of a pass). `proportional` orders those
batches at random (seeded per epoch), so each dataset comes up in proportion to its share; `round_robin`
takes one from each dataset in turn while it has some. With P processes, every step's P batches come from
one dataset (cross-device negatives then compare like with like).
"""

import itertools
import math
import random

import torch

from mrl.data.sampler import BatchSampler


class MixtureBatchSampler:
    """Batches of global row indices (dataset d's row r is offsets[d] + r), each from one dataset; steps of P
    batches from one dataset. samplers: one mrl.data.BatchSampler per dataset (with processes=P). Each pass over
    a dataset is its sampler's plan (made once); the length and the checks count steps from the plans, and
    an epoch's steps are read from them as it runs, not held as lists."""

    def __init__(self, samplers: list[BatchSampler], weights: list[float], mode: str = "proportional",
                 seed: int = 0, processes: int = 1):
        self.samplers, self.weights, self.mode, self.seed, self.processes = samplers, weights, mode, seed, processes
        self.offsets = [0]
        for sampler in samplers[:-1]:
            self.offsets.append(self.offsets[-1] + sampler.n_rows)
        self.epoch, self._counts = 0, {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pass(self, d: int, n_pass: int) -> BatchSampler:
        """Dataset d's sampler at pass n of this epoch (each pass its own shuffle; the first: the epoch's)."""
        sampler = self.samplers[d]
        sampler.set_epoch(self.epoch + 1_000_000 * n_pass)
        return sampler

    def pass_steps(self, d: int, n_pass: int = 0) -> int:
        """How many steps pass n over dataset d gives. A last step of fewer rows than processes cannot give each
        a row: it is left out (at most P - 1 rows a pass, other rows in the next pass's shuffle; `left_out`
        counts them)."""
        key = (self.epoch, d, n_pass)
        if key not in self._counts:
            self._counts[key] = self._pass(d, n_pass).full_steps()[0]
        return self._counts[key]

    def left_out(self, d: int) -> int:
        """Rows of dataset d in no step of this epoch's first pass."""
        return self.samplers[d].n_rows - self._pass(d, 0).full_steps()[1]

    def step_counts(self, d: int) -> list[int]:
        """Dataset d's steps of this epoch, pass by pass: weight × one pass over its batches (a fraction: the
        first part of a pass; weight 2: two passes, each reshuffled)."""
        first = self.pass_steps(d)
        if not first:
            raise ValueError(f"data.train: dataset {d} has fewer rows ({self.samplers[d].n_rows}) than "
                             f"processes ({self.processes}): no step can be made of it")
        wanted, counts = math.ceil(self.weights[d] * first), [first]
        while sum(counts) < wanted:
            counts.append(self.pass_steps(d, len(counts)))
        counts[-1] -= sum(counts) - wanted
        return counts

    def steps(self, d: int):
        """Dataset d's steps of this epoch, P batches each, read pass after pass from its sampler's plans."""
        for n_pass, count in enumerate(self.step_counts(d)):
            yield from itertools.islice(self._pass(d, n_pass).steps(full_only=True), count)

    def __iter__(self):
        counts = [sum(self.step_counts(d)) for d in range(len(self.samplers))]
        per_dataset = [self.steps(d) for d in range(len(self.samplers))]
        if self.mode == "proportional":
            order = [d for d, n in enumerate(counts) for _ in range(n)]
            if len(counts) > 1:  # (one dataset: the order is all 0s, whatever the shuffle)
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        else:  # round robin: one step from each dataset in turn, while it has steps
            order = [d for turn in range(max(counts)) for d in range(len(counts)) if turn < counts[d]]
        for d in order:
            for batch in next(per_dataset[d]):
                yield [self.offsets[d] + r for r in batch] if self.offsets[d] else batch

    def __len__(self) -> int:
        return self.processes * sum(sum(self.step_counts(d)) for d in range(len(self.samplers)))


class MixtureTable(torch.utils.data.Dataset):
    """The datasets as one: global index -> (dataset index, its row)."""

    def __init__(self, tables: list):
        self.tables, self.offsets = tables, [0]
        for table in tables[:-1]:
            self.offsets.append(self.offsets[-1] + len(table))

    def __len__(self) -> int:
        return self.offsets[-1] + len(self.tables[-1])

    def __getitem__(self, index: int) -> tuple[int, dict]:
        d = max(i for i, offset in enumerate(self.offsets) if offset <= index)
        return d, self.tables[d][index - self.offsets[d]]


class MixtureCollator:
    """Rows of one dataset -> its collator's batch, plus `dataset` (its index). names: the datasets' names (in
    data.train), in the collators' order."""

    def __init__(self, collators: list, names: list[str]):
        self.collators, self.names = collators, names
        self.n_columns = [len(c.columns) for c in collators]  # each dataset's text columns

    def __call__(self, items: list[tuple[int, dict]]) -> dict:
        d = items[0][0]
        batch = self.collators[d]([row for _, row in items])
        batch["dataset"] = d
        return batch

    def pop_targets(self, batch: dict) -> tuple[int, dict]:
        """Take out of a batch what is not the encoder's input: (its dataset's index, the loss's keyword
        arguments: `labels` (or None) and `teacher`, the teacher's embeddings as one (B, D_t) tensor per column
        (or None))."""
        dataset, teacher = batch.pop("dataset"), batch.pop("teacher", None)
        teacher = None if teacher is None else list(teacher.chunk(self.n_columns[dataset]))
        return dataset, {"labels": batch.pop("labels", None), "teacher": teacher}

    def source(self, dataset: int) -> str | None:
        """The name a mixture's dataset is logged under (train/loss/<name>/...); None for one dataset alone."""
        return self.names[dataset] if len(self.names) > 1 else None
