"""The batch plan (mrl.data.sampler, mrl.data.mixture) gives the batches main gave before it was made of arrays:
the same rows in the same order for the same seed, for the contrastive NLI recipe's table (no-duplicates batches,
one and two processes, two epochs) and the NLI + STS mixture; and the same as a list-based re-derivation of the
rules on many small tables. Checks, length and left-out rows are read from the one plan."""

import hashlib
import json
import random
from collections import Counter

import pytest

from mrl.data import BatchSampler, load_table, text_columns, text_keys
from mrl.data.mixture import MixtureBatchSampler
from mrl.data.sampler import shared_texts
from mrl.sources import load_mirror

from conftest import SHARED

# (batches, sha256 of json.dumps(batches)[:16]) recorded with main's sampler (commit 4d11a57), through
# configs/mirror.yaml: the 19,558 NLI triplets and the 5,749 STS-B train pairs
MAIN = {
    ("nli", 128, 0, 1, 0): (153, "6a269e123f02991e"), ("nli", 128, 0, 1, 1): (153, "988aad0df6a228dc"),
    ("nli", 16, 3, 1, 0): (1223, "ed25a8ada6b6ab80"), ("nli", 16, 3, 1, 1): (1223, "64691a3925cdebce"),
    ("nli", 64, 0, 2, 0): (306, "0a85e81ab60adc10"), ("nli", 64, 0, 2, 1): (306, "0a9e5c8db488cd32"),
    ("sts", 128, 0, 1, 0): (45, "7804b1c98fda7d7c"), ("sts", 128, 0, 1, 1): (45, "d91f6757e9382e70"),
    ("sts", 16, 3, 1, 0): (360, "7c0c114579c6b54c"), ("sts", 16, 3, 1, 1): (360, "7637a1a7fc81fb47"),
    ("sts", 64, 0, 2, 0): (90, "6c499ba34f7bfc90"), ("sts", 64, 0, 2, 1): (90, "aad9654fae21a235"),
}
MAIN_MIXTURE = {1: (333, "da8d8f9fa650dbc9"), 2: (338, "cf310d8d492307d6")}  # nli + sts (weight 4), batch 128


def digest(batches) -> tuple[int, str]:
    return len(batches), hashlib.sha256(json.dumps([list(map(int, b)) for b in batches]).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def tables():
    if not (SHARED / "data" / "nli").is_dir() or not (SHARED / "data" / "stsb").is_dir():
        pytest.skip("no NLI triplets or STS-B in ../shared")
    mirror = load_mirror("configs/mirror.yaml")
    nli = load_table({"path": "sentence-transformers/all-nli", "name": "triplet", "split": "train"}, "data.train",
                     False, mirror)
    sts = load_table({"path": "sentence-transformers/stsb", "split": "train"}, "data.train", True, mirror)
    return {name: list(zip(*(t[c] for c in text_columns(t)))) for name, t in (("nli", nli), ("sts", sts))}


@pytest.mark.parametrize("case", sorted(MAIN))
def test_the_plan_gives_main_s_batches(tables, case):
    name, size, seed, processes, epoch = case
    sampler = MixtureBatchSampler([BatchSampler(tables[name], size, name == "nli", False, seed, processes)], [1.0],
                                  seed=seed, processes=processes)
    sampler.set_epoch(epoch)
    assert digest(list(sampler)) == MAIN[case]
    assert len(sampler) == MAIN[case][0]


@pytest.mark.parametrize("processes", [1, 2])
def test_the_mixture_gives_main_s_batches(tables, processes):
    samplers = [BatchSampler(tables["nli"], 128, True, False, 0, processes),
                BatchSampler(tables["sts"], 128, False, False, 0, processes)]
    mixture = MixtureBatchSampler(samplers, [1.0, 4.0], "proportional", 0, processes)
    assert len(mixture) == MAIN_MIXTURE[processes][0]  # the length first: it plans the later passes
    assert digest(list(mixture)) == MAIN_MIXTURE[processes]


def list_sampler(rows, batch_size, no_duplicates, drop_last, seed, processes, epoch):
    """The rules re-derived on lists: shuffle, fill one batch of P·batch_size rows at a time from the rows left (no
    text twice in one, with no_duplicates), stop at a short step with drop_last, cut each step into P parts."""
    order = list(range(len(rows)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    size, steps = batch_size * processes, []
    while order:
        step, seen = [], set()
        for i in order:
            if len(step) < size and (not no_duplicates or seen.isdisjoint(rows[i])):
                step.append(i)
                seen.update(rows[i])
        taken = set(step)
        order = [i for i in order if i not in taken]
        if drop_last and len(step) < size:
            break
        steps.append(step)
    batches = []
    for step in steps:
        cuts = [len(step) * p // processes for p in range(processes + 1)] if len(step) >= processes else [0, len(step)]
        batches += [step[a:b] for a, b in zip(cuts, cuts[1:])]
    return batches


@pytest.mark.parametrize("seed", range(40))
def test_the_plan_equals_the_rules_written_on_lists(seed):
    rng = random.Random(seed)
    n, pool, k = rng.choice([1, 5, 37, 200]), rng.choice([4, 30, 10**9]), rng.choice([2, 3])
    rows = [tuple(f"text {rng.randrange(pool)}" for _ in range(k)) for _ in range(n)]
    args = rng.choice([1, 3, 8]), rng.random() < 0.7, rng.random() < 0.3, rng.randrange(3), rng.choice([1, 2, 3])
    sampler = BatchSampler(rows, *args)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        expected = list_sampler(rows, *args, epoch)
        assert list(sampler) == expected and len(sampler) == len(expected)
        sizes = [len(b) for b in expected]
        small = [s for s in sizes[:-args[4]] if s < args[0]]
        assert sampler.shrunk_batches() == (len(sizes), len(small), min(small, default=args[0]))


def test_the_plan_is_made_once_per_epoch_and_holds_no_list_per_row(monkeypatch):
    rows = [(f"anchor {i}", f"positive {i % 50}") for i in range(1000)]
    sampler, made = BatchSampler(rows, 16, True, processes=2), []
    make = sampler._make_plan
    monkeypatch.setattr(sampler, "_make_plan", lambda: made.append(1) or make())
    mixture = MixtureBatchSampler([sampler], [1.0], processes=2)
    len(mixture), mixture.left_out(0), sampler.shrunk_batches(), list(mixture)
    assert len(made) == 1
    order, lengths = sampler.plan()
    assert order.dtype.kind == "i" and sorted(order.tolist()) == list(range(1000)) and lengths.sum() == 1000


def test_repeated_texts_are_found_across_chunks_and_columns():
    rng = random.Random(0)
    rows = [(f"a {rng.randrange(300)}", f"p {i}", f"a {rng.randrange(3000)}") for i in range(1000)]
    keys = text_keys(rows)
    one = shared_texts([[keys[:, j]] for j in range(3)])
    cuts = [0, 1, 7, 400, 401, 1000]
    chunked = shared_texts([[keys[a:b, j] for a, b in zip(cuts, cuts[1:])] for j in range(3)])
    assert (one[0] == chunked[0]).all() and (one[1] == chunked[1]).all()
    repeated = {t for t, n in Counter(t for row in rows for t in row).items() if n > 1}
    assert [bool(set(row) & repeated) for row in rows] == one[1].tolist()
    assert shared_texts([[keys[:, 1]]]) == (None, None)  # the positives are all distinct
