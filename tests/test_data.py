"""mrl.data (load_table, BatchSampler, Collator) and mrl.sources (mirror files), on small files in tmp_path."""

import csv
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from mrl.data import LABEL, BatchSampler, Collator, load_table, text_columns
from mrl.sources import MIRROR_ENV, load_mirror, resolve_dataset, resolve_model

from conftest import SHARED


@pytest.fixture(autouse=True)
def no_mirror_env(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)


# --- BatchSampler ------------------------------------------------------------------------------------------------


def rows_with_repeats(n=60, n_texts=8, columns=3, seed=0):
    """Rows of `columns` texts drawn from a small pool, so that many rows share texts."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        rows.append(tuple(f"text {rng.randrange(n_texts)}" for _ in range(columns)))
    return rows


def all_batches(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_no_duplicates_never_repeats_a_text_in_a_batch(batch_size, seed):
    rows = rows_with_repeats(seed=seed)
    sampler = BatchSampler(rows, batch_size, no_duplicates=True, seed=seed)
    for epoch in range(3):
        batches = all_batches(sampler, epoch)
        for batch in batches:
            assert 1 <= len(batch) <= batch_size
            texts = [t for i in batch for t in rows[i]]
            # a row may repeat its own text (anchor == positive), but no text is shared between two rows
            owners = {}
            for i in batch:
                for t in set(rows[i]):
                    assert t not in owners, f"text {t!r} in rows {owners[t]} and {i} of one batch"
                    owners[t] = i
            assert texts
        assert Counter(i for b in batches for i in b) == Counter(range(len(rows)))  # every row exactly once
        assert len(sampler) == len(batches)


def test_no_duplicates_batches_are_full_when_texts_are_distinct():
    rows = [(f"a{i}", f"b{i}") for i in range(23)]
    batches = all_batches(BatchSampler(rows, 5, no_duplicates=True, seed=3))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    # with no duplicates to avoid, it is the same as the plain shuffle
    assert batches == all_batches(BatchSampler(rows, 5, no_duplicates=False, seed=3))


@pytest.mark.parametrize("no_duplicates", [True, False])
def test_sampler_is_deterministic_per_seed_and_epoch(no_duplicates):
    rows = rows_with_repeats(n=40, n_texts=30, seed=2)
    a = BatchSampler(rows, 4, no_duplicates=no_duplicates, seed=7)
    b = BatchSampler(rows, 4, no_duplicates=no_duplicates, seed=7)
    assert all_batches(a, 0) == all_batches(b, 0)
    assert all_batches(a, 5) == all_batches(b, 5)
    assert all_batches(a, 0) != all_batches(a, 1)  # reshuffled every epoch
    assert all_batches(a, 0) != all_batches(BatchSampler(rows, 4, no_duplicates=no_duplicates, seed=8), 0)
    assert list(a) == list(a)  # iterating twice in one epoch gives the same batches


def test_plain_batches_are_shuffled_chunks():
    rows = [("same", "same") for _ in range(17)]  # duplicates are not avoided without no_duplicates
    sampler = BatchSampler(rows, 5, no_duplicates=False, seed=4)
    batches = all_batches(sampler, 2)
    assert [len(b) for b in batches] == [5, 5, 5, 2]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(17))
    assert flat != list(range(17))
    # the chunks are consecutive slices of one permutation of the rows, seeded by (seed, epoch)
    order = list(range(17))
    random.Random(4 * 1_000_003 + 2).shuffle(order)
    assert flat == order
    assert len(sampler) == 4


@pytest.mark.parametrize("no_duplicates", [True, False])
def test_drop_last(no_duplicates):
    rows = [(f"a{i}", f"b{i}") for i in range(17)]
    kept = all_batches(BatchSampler(rows, 5, no_duplicates=no_duplicates, drop_last=True, seed=1))
    full = all_batches(BatchSampler(rows, 5, no_duplicates=no_duplicates, drop_last=False, seed=1))
    assert [len(b) for b in kept] == [5, 5, 5]
    assert kept == full[:3] and len(full[3]) == 2
    exact = [(f"a{i}", f"b{i}") for i in range(15)]
    assert len(all_batches(BatchSampler(exact, 5, no_duplicates=no_duplicates, drop_last=True))) == 3


def test_drop_last_with_duplicates_keeps_only_full_batches():
    rows = rows_with_repeats(n=50, n_texts=12, columns=2, seed=5)
    sampler = BatchSampler(rows, 4, no_duplicates=True, drop_last=True, seed=0)
    batches = all_batches(sampler)
    assert batches and all(len(b) == 4 for b in batches)
    assert len(sampler) == len(batches)


# --- load_table --------------------------------------------------------------------------------------------------


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def spec_for(path, kind, tmp_path, **extra):
    return {"path": kind, "data_files": str(path), "split": "train", "cache_dir": str(tmp_path / "hf-cache"),
            **extra}


STS_ROWS = [("A plane is taking off.", "An air plane is taking off.", 5.0),
            ("A man is playing a flute.", "A man is playing a large flute.", 3.8),
            ("A cat sleeps.", "The stock market fell.", 0.0),
            ("Two dogs play.", "Dogs are playing.", 4.2)]
NLI_ROWS = [{"anchor": f"anchor {i}", "positive": f"positive {i}", "negative": f"negative {i}", "source": "snli"}
            for i in range(5)]


@pytest.fixture
def sts_csv(tmp_path):
    return write_csv(tmp_path / "sts.csv", ["sentence1", "sentence2", "score"], STS_ROWS)


@pytest.fixture
def nli_jsonl(tmp_path):
    return write_jsonl(tmp_path / "nli.jsonl", NLI_ROWS)


def test_load_table_sts_with_label(sts_csv, tmp_path):
    table = load_table(spec_for(sts_csv, "csv", tmp_path, score_max=5), "data.train", needs_label=True)
    assert table.column_names == ["sentence1", "sentence2", LABEL]
    assert text_columns(table) == ["sentence1", "sentence2"]
    assert table["sentence1"] == [r[0] for r in STS_ROWS]
    assert table["sentence2"] == [r[1] for r in STS_ROWS]
    assert table[LABEL] == pytest.approx([r[2] / 5 for r in STS_ROWS])


def test_load_table_refuses_scores_outside_0_1_naming_the_row_and_score_max(sts_csv, tmp_path):
    """Scores 0..5 without score_max: the log would say "label in [0, 1]"; an error names the row and the fix."""
    first_outside = next(i for i, row in enumerate(STS_ROWS) if row[2] > 1)
    with pytest.raises(ValueError, match=rf"sts.csv\): column 'score' row {first_outside}: .* outside \[0, 1\]; "
                                         rf"set data.train.score_max"):
        load_table(spec_for(sts_csv, "csv", tmp_path), "data.train", needs_label=True)


def test_load_table_drops_label_when_not_needed(sts_csv, tmp_path):
    table = load_table(spec_for(sts_csv, "csv", tmp_path, score_max=5), "data.train", needs_label=False)
    assert table.column_names == ["sentence1", "sentence2"]


def test_load_table_column_called_label(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["first", "second", "label"], [("a b", "c d", 1), ("e f", "g h", 0)])
    table = load_table(spec_for(path, "csv", tmp_path), "eval.dev", needs_label=True)
    assert table.column_names == ["first", "second", LABEL]
    assert table[LABEL] == [1.0, 0.0]


def test_load_table_explicit_label_column(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["s1", "s2", "gold"], [("a b", "c d", 4), ("e f", "g h", 2)])
    table = load_table(spec_for(path, "csv", tmp_path, label="gold", score_max=4), "eval.dev", needs_label=True)
    assert table.column_names == ["s1", "s2", LABEL]
    assert table[LABEL] == [1.0, 0.5]


def test_load_table_default_columns_are_every_text_column_in_order(nli_jsonl, tmp_path):
    table = load_table(spec_for(nli_jsonl, "json", tmp_path), "data.train")
    assert table.column_names == ["anchor", "positive", "negative", "source"]  # `source` is text too


def test_load_table_explicit_columns(nli_jsonl, tmp_path):
    table = load_table(spec_for(nli_jsonl, "json", tmp_path, columns=["anchor", "positive", "negative"]),
                       "data.train")
    assert table.column_names == ["anchor", "positive", "negative"]
    assert table["negative"] == [r["negative"] for r in NLI_ROWS]
    reordered = load_table(spec_for(nli_jsonl, "json", tmp_path, columns=["positive", "anchor"]), "data.train")
    assert reordered.column_names == ["positive", "anchor"]
    assert reordered[0] == {"positive": "positive 0", "anchor": "anchor 0"}


def test_load_table_ignores_non_text_columns(tmp_path):
    rows = [{"id": i, "q": f"question {i}", "p": f"passage {i}"} for i in range(3)]
    table = load_table(spec_for(write_jsonl(tmp_path / "t.jsonl", rows), "json", tmp_path), "data.train")
    assert table.column_names == ["q", "p"]


def test_load_table_missing_column(nli_jsonl, tmp_path):
    with pytest.raises(ValueError, match=r"data\.train\.columns.*nope"):
        load_table(spec_for(nli_jsonl, "json", tmp_path, columns=["anchor", "nope"]), "data.train")


def test_load_table_missing_label_column(sts_csv, tmp_path):
    with pytest.raises(ValueError, match=r"eval\.dev\.label.*gold"):
        load_table(spec_for(sts_csv, "csv", tmp_path, label="gold"), "eval.dev", needs_label=True)


def test_load_table_needs_label_but_none(nli_jsonl, tmp_path):
    with pytest.raises(ValueError, match=r"data\.train\.label"):
        load_table(spec_for(nli_jsonl, "json", tmp_path), "data.train", needs_label=True)


def test_load_table_fewer_than_two_text_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["sentence", "score"], [("a b", 1.0), ("c d", 2.0)])
    with pytest.raises(ValueError, match=r"data\.train\.columns"):
        load_table(spec_for(path, "csv", tmp_path), "data.train")


def test_load_table_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.train\.data_files.*nowhere\.csv"):
        load_table(spec_for(tmp_path / "nowhere.csv", "csv", tmp_path), "data.train")
    spec = {"path": "csv", "split": "train", "data_files": {"train": [str(tmp_path / "nowhere.csv")]}}
    with pytest.raises(FileNotFoundError, match=r"eval\.test\.data_files"):
        load_table(spec, "eval.test")


def test_load_table_missing_split_key(sts_csv, tmp_path):
    spec = spec_for(sts_csv, "csv", tmp_path)
    del spec["split"]
    with pytest.raises(ValueError, match=r"eval\.dev\.split"):
        load_table(spec, "eval.dev")


def test_load_table_unknown_split_names_the_field(sts_csv, tmp_path):
    spec = spec_for(sts_csv, "csv", tmp_path)
    spec["data_files"] = {"train": sts_csv}
    spec["split"] = "validation"
    with pytest.raises(ValueError, match=r"eval\.dev"):
        load_table(spec, "eval.dev")


@pytest.mark.parametrize("cell", ["", "   "])
def test_load_table_empty_text_cell(tmp_path, cell):
    path = write_csv(tmp_path / "t.csv", ["sentence1", "sentence2", "score"],
                     [("a b", "c d", 1.0), ("e f", cell, 2.0), ("g h", "i j", 3.0)])
    with pytest.raises(ValueError, match=r"data\.train.*sentence2.*row 1"):
        load_table(spec_for(path, "csv", tmp_path), "data.train", needs_label=True)


def test_load_table_blank_text_in_json(tmp_path):
    rows = [{"anchor": "a", "positive": "b"}, {"anchor": " \t", "positive": "c"}]
    with pytest.raises(ValueError, match=r"data\.train.*anchor.*row 1"):
        load_table(spec_for(write_jsonl(tmp_path / "t.jsonl", rows), "json", tmp_path), "data.train")



def test_load_table_empty_csv_names_the_field(tmp_path):
    path = write_csv(tmp_path / "empty.csv", ["sentence1", "sentence2", "score"], [])
    with pytest.raises(ValueError, match=r"data\.train"):
        load_table(spec_for(path, "csv", tmp_path), "data.train", needs_label=True)


def test_load_table_empty_jsonl_names_the_field(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=r"data\.train"):
        load_table(spec_for(path, "json", tmp_path), "data.train")


def test_load_table_empty_split_slice_names_the_field(nli_jsonl, tmp_path):
    with pytest.raises(ValueError, match=r"data\.train"):
        load_table(spec_for(nli_jsonl, "json", tmp_path, split="train[:0]"), "data.train")


# --- mrl.sources ---------------------------------------------------------------------------------------------------


@pytest.fixture
def mirror_setup(tmp_path, sts_csv):
    """A mirror file in tmp_path/mirror/ with relative paths to a model folder and a dataset that exist, and to
    ones that do not."""
    root = tmp_path / "mirror"
    (root / "models" / "present").mkdir(parents=True)
    (root / "data").mkdir()
    write_csv(root / "data" / "train.csv", ["sentence1", "sentence2", "score"], STS_ROWS)
    mirror = {
        "models": {"org/present-model": "models/present", "org/absent-model": "models/absent"},
        "datasets": {
            "org/sts": {"path": "csv", "data_files": {"train": "data/train.csv"}, "score_max": 5},
            "org/absent-data": {"path": "json", "data_files": {"train": ["data/absent.jsonl"]}},
        },
    }
    path = root / "mirror.yaml"
    path.write_text(yaml.safe_dump(mirror))
    return path


def test_load_mirror_makes_paths_absolute(mirror_setup):
    mirror = load_mirror(str(mirror_setup))
    root = mirror_setup.parent
    assert mirror["file"] == str(mirror_setup)
    assert mirror["models"]["org/present-model"] == os.path.join(root, "models/present")
    assert mirror["datasets"]["org/sts"]["data_files"] == {"train": os.path.join(root, "data/train.csv")}
    assert mirror["datasets"]["org/absent-data"]["data_files"] == {"train": [os.path.join(root, "data/absent.jsonl")]}
    assert mirror["datasets"]["org/sts"]["score_max"] == 5


def test_load_mirror_none_and_missing(tmp_path):
    assert load_mirror(None) == {}
    with pytest.raises(FileNotFoundError, match="mirror"):
        load_mirror(str(tmp_path / "no-such-mirror.yaml"))


def test_load_mirror_unknown_section(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("models: {}\nweights: {}\n")
    with pytest.raises(KeyError, match="weights"):
        load_mirror(str(path))


def test_load_mirror_env_overrides_the_config(mirror_setup, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(mirror_setup))
    assert load_mirror(None)["file"] == str(mirror_setup)
    assert load_mirror(str(tmp_path / "other.yaml"))["file"] == str(mirror_setup)
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match="MRL_MIRROR|mirror"):
        load_mirror(str(mirror_setup))


def test_resolve_model(mirror_setup, tmp_path):
    mirror = load_mirror(str(mirror_setup))
    assert resolve_model("org/present-model", mirror) == os.path.join(mirror_setup.parent, "models/present")
    assert resolve_model("org/absent-model", mirror) == "org/absent-model"  # local copy missing: the hub id
    assert resolve_model("org/unlisted", mirror) == "org/unlisted"
    assert resolve_model("org/present-model", {}) == "org/present-model"
    local = tmp_path / "local-model"
    local.mkdir()
    assert resolve_model(str(local), mirror) == str(local)
    with pytest.raises(FileNotFoundError, match="model.name"):
        resolve_model(str(tmp_path / "no-such-model"), mirror)


def test_resolve_dataset(mirror_setup):
    mirror = load_mirror(str(mirror_setup))
    spec = {"path": "org/sts", "name": "default", "split": "train", "columns": ["sentence1", "sentence2"]}
    resolved = resolve_dataset(spec, mirror)
    assert resolved == {"path": "csv", "data_files": {"train": os.path.join(mirror_setup.parent, "data/train.csv")},
                        "score_max": 5, "split": "train", "columns": ["sentence1", "sentence2"]}
    assert spec["path"] == "org/sts"  # not mutated
    absent = {"path": "org/absent-data", "split": "train"}
    assert resolve_dataset(absent, mirror) == absent  # missing copy: the hub id unchanged
    assert resolve_dataset({"path": "org/unlisted", "split": "train"}, mirror) == {"path": "org/unlisted",
                                                                                     "split": "train"}
    assert resolve_dataset(spec, {}) == spec


def test_load_table_through_the_mirror(mirror_setup, tmp_path):
    mirror = load_mirror(str(mirror_setup))
    spec = {"path": "org/sts", "split": "train", "cache_dir": str(tmp_path / "hf-cache")}
    table = load_table(spec, "data.train", needs_label=True, mirror=mirror)
    assert table.column_names == ["sentence1", "sentence2", LABEL]
    assert table[LABEL] == pytest.approx([r[2] / 5 for r in STS_ROWS])


@pytest.mark.integration
def test_repo_mirror_serves_shared_stsb(tmp_path):
    mirror_file = str(Path(__file__).resolve().parents[1] / "configs" / "mirror.yaml")
    if not (SHARED / "data" / "stsb" / "dev.csv").is_file():
        pytest.skip("no STS-B copy in ../shared")
    mirror = load_mirror(mirror_file)
    spec = {"path": "sentence-transformers/stsb", "split": "validation", "cache_dir": str(tmp_path / "hf-cache")}
    table = load_table(spec, "eval.dev", needs_label=True, mirror=mirror)
    with open(SHARED / "data" / "stsb" / "dev.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert table.column_names == ["sentence1", "sentence2", LABEL]
    assert table[LABEL] == pytest.approx([float(r["score"]) / 5 for r in rows])
    assert 0.0 <= min(table[LABEL]) and max(table[LABEL]) <= 1.0


# --- Collator ----------------------------------------------------------------------------------------------------


def test_collator_with_labels(tiny_encoder, sts_csv, tmp_path):
    table = load_table(spec_for(sts_csv, "csv", tmp_path, score_max=5), "data.train", needs_label=True)
    rows = [table[i] for i in range(len(table))]
    collate = Collator(text_columns(table), tiny_encoder.tokenizer, tiny_encoder.max_seq_length)
    batch = collate(rows)
    B, k = len(rows), 2
    assert batch["input_ids"].dim() == 2 and batch["input_ids"].shape[0] == k * B
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["labels"].dtype == torch.float32
    torch.testing.assert_close(batch["labels"], torch.tensor([r[2] / 5 for r in STS_ROWS], dtype=torch.float32))
    # column-major: all first sentences, then all second sentences, each padded to the batch's longest text
    texts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
    T = batch["input_ids"].shape[1]
    assert T == max(len(tiny_encoder.tokenizer(t)["input_ids"]) for t in texts)
    for n, text in enumerate(texts):
        ids = tiny_encoder.tokenizer(text)["input_ids"]
        assert batch["input_ids"][n, :len(ids)].tolist() == ids
        assert batch["attention_mask"][n].sum() == len(ids)


def test_collator_without_labels(tiny_encoder, nli_jsonl, tmp_path):
    table = load_table(spec_for(nli_jsonl, "json", tmp_path, columns=["anchor", "positive", "negative"]),
                       "data.train")
    rows = [table[i] for i in range(3)]
    batch = Collator(text_columns(table), tiny_encoder.tokenizer, tiny_encoder.max_seq_length)(rows)
    assert "labels" not in batch
    assert batch["input_ids"].shape[0] == 3 * 3
    decoded = [tiny_encoder.tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["input_ids"]]
    assert decoded == [f"{c} {i}" for c in ("anchor", "positive", "negative") for i in range(3)]


@pytest.mark.parametrize("processes", [2, 3])
def test_no_duplicates_across_the_batches_of_one_step(processes):
    """Accelerate deals consecutive batches to the processes of one step: together they hold no repeated text
    (with one duplicate-free batch per process only, a repeated text would meet itself on another process)."""
    rng = random.Random(1)
    rows = [(f"anchor {rng.randrange(150)}", f"positive {rng.randrange(150)}") for _ in range(300)]
    batches = list(BatchSampler(rows, 8, no_duplicates=True, seed=0, processes=processes))
    assert sorted(i for b in batches for i in b) == list(range(300))  # nothing dropped or repeated

    def steps_with_a_repeat(batches):
        steps = [[t for b in batches[s:s + processes] for i in b for t in rows[i]]
                 for s in range(0, len(batches), processes)]
        return sum(len(texts) != len(set(texts)) for texts in steps)

    assert steps_with_a_repeat(batches) == 0
    assert steps_with_a_repeat(list(BatchSampler(rows, 8, no_duplicates=True, seed=0))) > 0  # what it prevents


@pytest.mark.parametrize("fixture, columns", [("sts_csv", None), ("nli_jsonl", ["anchor", "positive", "negative"])])
def test_pretokenised_rows_collate_to_the_same_batch(tiny_encoder, fixture, columns, tmp_path, request):
    path = request.getfixturevalue(fixture)
    spec = spec_for(path, "csv" if fixture == "sts_csv" else "json", tmp_path,
                    **({"score_max": 5} if columns is None else {"columns": columns}))
    table = load_table(spec, "data.train", needs_label=columns is None)
    lengths = sorted(len(tiny_encoder.tokenizer(t)["input_ids"]) for c in text_columns(table) for t in table[c])
    max_length = lengths[len(lengths) // 2]  # STS: the longer half of the texts is cut, the rest padded
    collate = Collator(text_columns(table), tiny_encoder.tokenizer, max_length)
    tokenised = collate.pretokenize(table)
    assert text_columns(tokenised) == text_columns(table)
    rows, tokenised_rows = [table[i] for i in range(len(table))], [tokenised[i] for i in range(len(table))]
    expected, batch = collate(rows), collate(tokenised_rows)
    assert list(batch) == list(expected)
    assert expected["input_ids"].shape[1] == max_length
    if fixture == "sts_csv":
        assert lengths[0] < max_length < lengths[-1] and (expected["attention_mask"].sum(1) < max_length).any()
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
