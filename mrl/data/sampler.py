"""The batches of one training table: an epoch's plan made once, in one pass, as two arrays (the rows in batch
order, the length of each step's duplicate-free batch), and read by the loader, the checks and the length alike.

Memory is one index array per table (8 bytes a row), whatever the number of rows: no Python object per row.
No-duplicates batching compares texts by a 64-bit hash of each (`text_keys`); only texts that occur more than
once in the table can ever meet again, so only they are kept, and a table whose texts are all distinct is cut
into batches without a loop. Two distinct texts with equal hashes (about n²/2⁶⁵ for n texts: 1e-5 at 20M) would
only keep two rows apart.
"""

import array
import random
from collections import deque

import numpy as np
import xxhash


def text_keys(rows) -> np.ndarray:
    """(N, k) uint64: a hash of each text of each row (rows: N tuples of k texts), equal for equal texts."""
    return np.array([[xxhash.xxh3_64_intdigest(t.encode()) for t in row] for row in rows], dtype=np.uint64)


def shuffled(n: int, seed: int) -> np.ndarray:
    """range(n) in the order random.Random(seed).shuffle gives it (as the sampler always has), in 8 bytes a row:
    the shuffle runs on an array.array, not a list of Python ints."""
    order = array.array("q", range(n))
    random.Random(seed).shuffle(order)
    return np.frombuffer(order, dtype=np.int64)


class BatchSampler:
    """Shuffled batches of row indices, reshuffled every epoch from (seed, epoch) so a resumed run sees the same
    batches. With no_duplicates, a text never appears twice in one batch: a repeated text would be an in-batch
    negative of itself (a false negative). Rows that would repeat a text wait for a later batch, in order.

    processes=P: the P consecutive batches that Accelerate deals to P processes for one step are cut from one
    duplicate-free batch of P·batch_size rows, so cross-device negatives hold no false negative either.

    rows: the rows' texts (N tuples), or N with `shared` (from shared_texts; without no_duplicates, N alone).
    """

    def __init__(self, rows, batch_size: int, no_duplicates: bool = False, drop_last: bool = False,
                 seed: int = 0, processes: int = 1, shared: tuple | None = None):
        self.batch_size, self.no_duplicates, self.drop_last = batch_size, no_duplicates, drop_last
        self.seed, self.epoch, self.processes = seed, 0, processes
        self.n_rows = rows if isinstance(rows, int) else len(rows)
        if no_duplicates and shared is None:
            shared = shared_texts([[keys] for keys in text_keys(rows).T]) if self.n_rows else (None, None)
        self.shared = shared if no_duplicates else None
        self._plan = (None, None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, lengths) of this epoch: the rows in batch order and the length of each step's batch of up to
        P·batch_size rows; made once per epoch (the last epoch's plan is kept)."""
        if self._plan[0] != self.epoch:
            self._plan = self.epoch, self._make_plan()
        return self._plan[1]

    def _make_plan(self) -> tuple[np.ndarray, np.ndarray]:
        order, size = shuffled(self.n_rows, self.seed * 1_000_003 + self.epoch), self.batch_size * self.processes
        if self.shared is None or self.shared[1] is None:  # every batch full: consecutive rows of the shuffle
            lengths = np.full(self.n_rows // size, size, dtype=np.int64)
            if self.n_rows % size:
                lengths = np.append(lengths, self.n_rows % size)
        else:
            order, lengths = self._unique_text_batches(order, size)
        if self.drop_last:  # up to the first batch short of size (with repeated texts, not only the last)
            n = int(np.argmax(lengths < size)) if (lengths < size).any() else len(lengths)
            lengths = lengths[:n]
            order = order[:int(lengths.sum())]
        return order, lengths

    def _unique_text_batches(self, order: np.ndarray, size: int, max_open: int = 64):
        """(rows, lengths) of batches of up to `size` rows, no text twice in one: each row, in order, joins the
        oldest open batch that holds none of its texts, else opens one; a batch closes when full, and batches
        come out in the order they opened. That is filling one batch at a time from the rows left, in order, in
        one pass. At most `max_open` batches stay open (only texts that repeat very often get there): one more
        closes the oldest as it is, so the cost stays linear in the rows. Only the texts that repeat are
        compared (no other row holds the others), read in blocks of rows."""
        ids, has_shared = self.shared
        rows, lengths = array.array("q"), array.array("q")
        batches = deque()  # [rows, texts, closed], oldest first
        open_batches = []  # those not closed, oldest first
        for start in range(0, len(order), 65_536):
            block = order[start:start + 65_536]
            for i, texts, shared in zip(block.tolist(), ids[block].tolist(), has_shared[block].tolist()):
                texts = [t for t in texts if t >= 0] if shared else ()
                batch = next((b for b in open_batches if b[1].isdisjoint(texts)), None)
                if batch is None:
                    if len(open_batches) == max_open:
                        open_batches.pop(0)[2] = True
                    batch = [[], set(), False]
                    batches.append(batch)
                    open_batches.append(batch)
                batch[0].append(i)
                batch[1].update(texts)
                if len(batch[0]) == size:
                    batch[2] = True
                    open_batches.remove(batch)
                while batches and batches[0][2]:
                    done = batches.popleft()[0]
                    rows.extend(done)
                    lengths.append(len(done))
        for batch in batches:
            rows.extend(batch[0])
            lengths.append(len(batch[0]))
        return np.frombuffer(rows, dtype=np.int64), np.frombuffer(lengths, dtype=np.int64)

    def batch_sizes(self) -> np.ndarray:
        """The size of each batch of this epoch, in order: each step's batch cut into P contiguous parts, as
        equal as can be; a step of fewer rows than processes (only at the end of an epoch whose texts repeat a
        lot) stays whole."""
        lengths, parts = self.plan()[1], self.processes
        cuts = lengths[:, None] * np.arange(parts + 1) // parts  # (steps, P + 1)
        sizes = np.diff(cuts, axis=1)
        if not (lengths < parts).any():
            return sizes.ravel()
        return np.concatenate([lengths[i:i + 1] if n < parts else s for i, (s, n) in enumerate(zip(sizes, lengths))])

    def steps(self, full_only: bool = False):
        """This epoch's steps, each the P batches (lists of row indices) of one step; full_only: only the steps
        that give every process a batch (at least P rows)."""
        order, lengths = self.plan()
        start, parts = 0, self.processes
        for n in lengths.tolist():
            step = order[start:start + n].tolist()
            start += n
            if n < parts:
                if not full_only:
                    yield [step]
                continue
            cuts = [n * p // parts for p in range(parts + 1)]
            yield [step[a:b] for a, b in zip(cuts, cuts[1:])]

    def full_steps(self) -> tuple[int, int]:
        """(steps that give every process a batch, the rows in them) of this epoch."""
        lengths = self.plan()[1]
        full = lengths >= self.processes
        return int(full.sum()), int(lengths[full].sum())

    def __iter__(self):
        return (batch for step in self.steps() for batch in step)

    def shrunk_batches(self) -> tuple[int, int, int]:
        """(batches of this epoch, how many hold fewer than batch_size rows, the smallest of those), the last step's
        batches aside (they hold what is left)."""
        sizes = self.batch_sizes()
        small = sizes[:-self.processes][sizes[:-self.processes] < self.batch_size]
        return len(sizes), len(small), int(small.min()) if len(small) else self.batch_size

    def __len__(self) -> int:
        lengths = self.plan()[1]
        return int(np.where(lengths >= self.processes, self.processes, 1).sum())


def shared_texts(columns: list[list[np.ndarray]], buckets: int = 16) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(ids, has_shared) of the texts that occur more than once in the table: ids (N, k) int32, a number for each
    such text and -1 for the others; has_shared (N,) bool; (None, None) if every text occurs once. columns: each
    text column's hashes (`text_keys`), as chunks in row order (views of the memory-mapped table: nothing copied).
    Repeats are found a sixteenth of the hashes at a time (by their top 4 bits), so the memory this takes is a
    sixteenth of the hashes. A text repeated within its own row counts too (harmless: no other row holds it)."""
    repeated = []
    for bucket in range(buckets):
        part = np.sort(np.concatenate([chunk[chunk >> np.uint64(60) == bucket] for column in columns
                                       for chunk in column]))
        repeated.append(np.unique(part[1:][part[1:] == part[:-1]]))
    repeated = np.concatenate(repeated)  # sorted: the buckets are in order
    if not len(repeated):
        return None, None
    ids = np.empty((sum(map(len, columns[0])), len(columns)), dtype=np.int32)
    for j, column in enumerate(columns):
        start = 0
        for chunk in column:
            where = np.searchsorted(repeated, chunk).clip(max=len(repeated) - 1)
            ids[start:start + len(chunk), j] = np.where(repeated[where] == chunk, where, -1)
            start += len(chunk)
    return ids, (ids >= 0).any(axis=1)
