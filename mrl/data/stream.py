"""Streaming (data.streaming): a training table read as it trains, through `datasets`' iterable datasets, for
tables that do not fit a disk cache. Nothing is written: no Arrow copy, no token ids (the collator tokenises each
batch; data.num_workers does that in parallel), and only a window of rows is in memory.

The batches are the map-style ones wherever the rows allow: `StreamBatchSampler` reads the stream in windows of
data.shuffle_buffer rows and batches each window with the same BatchSampler (the same shuffle of (seed, epoch),
no-duplicates batches, P batches a step). A table that fits in one window is batched exactly as the map-style
path batches it. A longer one is shuffled within windows, as any stream is (the rows of a window's short last
batches move on to the next window), so its batches differ, and no-duplicates holds within each batch still.
What a stream cannot have: a known length (so train.max_steps is needed), a mixture (its proportions count each
dataset's batches), a teacher (loss.teacher: its embeddings come with the table, up front), the warnings of
degenerate data, and checks of every row before the first step (a row is checked when it is read, and an error
names it).
"""

import re

import datasets
import pyarrow as pa

from mrl.data.sampler import BatchSampler
from mrl.data.tables import (LABEL, empty_or_not_text, open_dataset, pick_columns, score, score_outside,
                             source_files)


class Stream:
    """The rows of a spec's text columns (and its label, divided by score_max), read from an IterableDataset and
    checked as they are read. column_names as a table's: the text columns, then `label` if it is needed."""

    def __init__(self, spec: dict, field: str, needs_label: bool = False, mirror: dict | None = None):
        split, rows = split_rows(spec.get("split"), field)
        spec = {**spec, **({"split": split} if split else {})}
        self.dataset, spec = open_dataset(spec, field, mirror, streaming=True)
        if rows.start:
            self.dataset = self.dataset.skip(rows.start)
        if rows.stop is not None:
            self.dataset = self.dataset.take(rows.stop - (rows.start or 0))
        features = self.dataset.features
        if features is None:  # (json: not known before a row is read)
            first = next(iter(self.dataset), None)
            if first is None:
                raise ValueError(f"{field}: the dataset {spec.get('path')!r} split {spec['split']!r} has no rows")
            features = datasets.Features.from_arrow_schema(pa.Table.from_pylist([first]).schema)
        self.columns, self.label = pick_columns(spec, field, features, needs_label)
        self.label = self.label if needs_label else None
        self.scale, self.field = float(spec.get("score_max") or 1.0), field
        self.where = f"{field} ({source_files(spec)})"
        self.column_names = self.columns + ([LABEL] if needs_label else [])

    def __iter__(self):
        for i, row in enumerate(self.dataset):
            for c in self.columns:
                if empty_or_not_text(row[c]):
                    raise ValueError(f"{self.where}: column {c!r} row {i} is empty or not text: {row[c]!r}")
            checked = {c: row[c] for c in self.columns}
            if self.label is not None:
                value = row[self.label]
                checked[LABEL] = score(value, self.scale, f"{self.where}: column {self.label!r} row {i}")
                if not 0 <= checked[LABEL] <= 1:
                    raise score_outside(self.where, self.label, i, value, checked[LABEL], self.scale, self.field)
            yield checked


def split_rows(split: str | None, field: str) -> tuple[str | None, slice]:
    """('train', slice(a, b)) of a split 'train[a:b]' (either end may be left out), ('train', slice(None)) of
    'train'. A stream's length is not known, so percentages ('train[:10%]') are refused."""
    match = re.fullmatch(r"([^\[\]]+)\[(\d*):(\d*)\]", split or "")
    if match is None:
        if split and "[" in split:
            raise ValueError(f"{field}.split: a stream takes a slice of rows (train[:1000], train[500:]), got "
                             f"{split!r}")
        return split, slice(None)
    name, start, stop = match.groups()
    return name, slice(int(start) if start else None, int(stop) if stop else None)


class StreamBatchSampler:
    """Batches of rows (dicts, for StreamRows) of a stream, a window of `buffer` rows at a time, each window batched
    by BatchSampler(batch_size, no_duplicates, drop_last, seed, processes): window w of epoch e as epoch
    e + 1_000_000·w (window 0: the epoch's own shuffle). The rows of a window's last steps that are short of
    P·batch_size rows join the next window; only the stream's last window keeps its short steps (drop_last
    drops them as it does for a table). Two windows are in memory (the next is read to know if this one is
    the last). `length`: the batches the run takes (train.max_steps · P · grad_accum), since a stream's own
    length is not known before it is read."""

    def __init__(self, stream, batch_size: int, no_duplicates: bool = False, drop_last: bool = False,
                 seed: int = 0, processes: int = 1, buffer: int = 100_000, length: int = 0):
        self.stream, self.batch_size, self.no_duplicates, self.drop_last = stream, batch_size, no_duplicates, drop_last
        self.seed, self.processes, self.buffer, self.length, self.epoch = seed, processes, buffer, length, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def windows(self):
        rows = iter(self.stream)
        while window := [row for _, row in zip(range(self.buffer), rows)]:
            yield window

    def __iter__(self):
        size, carried, windows = self.batch_size * self.processes, [], self.windows()
        window, w = next(windows, None), 0
        while window is not None:
            following, rows = next(windows, None), carried + window
            last = following is None
            texts = [tuple(row[c] for c in self.stream.columns) for row in rows]
            sampler = BatchSampler(texts if self.no_duplicates else len(rows), self.batch_size, self.no_duplicates,
                                   self.drop_last and last, self.seed, self.processes)
            sampler.set_epoch(self.epoch + 1_000_000 * w)
            steps = list(sampler.steps(full_only=True))  # (as a mixture of one: a step for every process)
            keep = len(steps)
            while not last and keep and sum(map(len, steps[keep - 1])) < size:  # short steps at the end: carried
                keep -= 1
            carried = [rows[i] for step in steps[keep:] for batch in step for i in batch]
            for step in steps[:keep]:
                for batch in step:
                    yield [rows[i] for i in batch]
            window, w = following, w + 1

    def __len__(self) -> int:
        return self.length


class StreamRows:
    """The DataLoader's dataset for a stream: its sampler yields the rows themselves, returned as (dataset 0, row)
    for mrl.data.mixture.MixtureCollator."""

    def __getitem__(self, row: dict) -> tuple[int, dict]:
        return 0, row
