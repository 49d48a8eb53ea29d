"""data.streaming (mrl/data/stream.py): the same batches as the map-style path for the same seed when the table
fits in the shuffle buffer (plain and no-duplicates, 1 and 2 processes, drop_last), every row once and no text
twice in a batch when it does not, rows checked as they are read, and a streamed run that trains exactly as the
map-style one and resumes where it would be; what it cannot do is refused at config load."""

import gzip
import json

import pytest
import torch
from safetensors.torch import load_file

from mrl.data import BatchSampler, load_table, text_columns
from mrl.data.mixture import MixtureBatchSampler
from mrl.data.stream import Stream, StreamBatchSampler
from mrl.run.config import load_config
from test_train import STSB, encode_saved, run_nli_recipe, run_train

from conftest import SHARED

NLI = SHARED / "data" / "nli" / "triplets.jsonl.gz"


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    """The first 700 NLI triplets as a json file (premises repeat: no-duplicates batches are not plain chunks)."""
    if not NLI.is_file():
        pytest.skip("no NLI triplets in ../shared")
    path = tmp_path_factory.mktemp("stream") / "triplets.jsonl"
    with gzip.open(NLI, "rt", encoding="utf-8") as f:
        path.write_text("".join(line for _, line in zip(range(700), f)), encoding="utf-8")
    return {"path": "json", "data_files": {"train": str(path)}, "split": "train",
            "columns": ["anchor", "positive", "negative"]}


def texts_of(batches, rows):
    return [[tuple(rows[i]) if isinstance(i, int) else tuple(i.values()) for i in batch] for batch in batches]


@pytest.mark.parametrize("no_duplicates", [False, True])
@pytest.mark.parametrize("processes, drop_last", [(1, False), (2, False), (3, True)])
def test_a_table_within_the_buffer_streams_the_map_style_batches(triplets, no_duplicates, processes, drop_last):
    table = load_table(triplets, "data.train")
    rows = list(zip(*(table[c] for c in text_columns(table))))
    mapped = MixtureBatchSampler([BatchSampler(rows, 16, no_duplicates, drop_last, 5, processes)], [1.0], seed=5,
                                 processes=processes)
    streamed = StreamBatchSampler(Stream(triplets, "data.train"), 16, no_duplicates, drop_last, 5, processes,
                                  buffer=700)
    for epoch in (0, 1):
        mapped.set_epoch(epoch)
        streamed.set_epoch(epoch)
        assert texts_of(list(streamed), rows) == texts_of(list(mapped), rows)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_longer_table_streams_each_row_once_without_a_repeated_text_in_a_step(triplets, processes):
    stream = Stream(triplets, "data.train")
    batches = list(StreamBatchSampler(stream, 16, True, False, 0, processes, buffer=100))
    texts = [tuple(row.values()) for batch in batches for row in batch]
    assert len(texts) > 700 - processes and len(set(texts)) == len(texts)  # (at most P - 1 rows left out)
    steps = [[t for b in batches[s:s + processes] for row in b for t in row.values()]
             for s in range(0, len(batches), processes)]
    assert all(len(step) == len(set(step)) for step in steps)
    assert sum(len(b) < 16 for b in batches[:-2 * processes]) <= len(batches) // 5  # mostly full batches
    mapped = MixtureBatchSampler([BatchSampler(list(map(tuple, (r.values() for r in stream))), 16, True,
                                               processes=processes)], [1.0], processes=processes)
    assert texts_of(batches, None) != texts_of(list(mapped), list(map(tuple, (r.values() for r in stream))))


def test_rows_are_checked_as_they_are_read(tmp_path):
    path = tmp_path / "sts.csv"
    path.write_text("sentence1,sentence2,score\na,b,5\nc,d,2.5\ne, ,1\n", encoding="utf-8")
    spec = {"path": "csv", "data_files": {"train": str(path)}, "split": "train", "score_max": 5}
    rows = iter(Stream(spec, "data.train", needs_label=True))
    assert next(rows) == {"sentence1": "a", "sentence2": "b", "label": 1.0} and next(rows)["label"] == 0.5
    with pytest.raises(ValueError, match=r"data.train \(.*sts.csv\): column 'sentence2' row 2 is empty or not text"):
        next(rows)
    assert [r["sentence1"] for r in Stream({**spec, "split": "train[1:2]"}, "data.train", needs_label=True)] == ["c"]
    refused = r"data.train.split: a stream takes a slice of rows \(train\[:1000\], train\[500:\]\), got 'train\[:50%\]'"
    with pytest.raises(ValueError, match=refused):
        Stream({**spec, "split": "train[:50%]"}, "data.train")
    with pytest.raises(ValueError, match=r"row 0: the score 5(\.0)? is 5 after dividing by score_max=1"):
        next(iter(Stream({**spec, "score_max": 1}, "data.train", needs_label=True)))


@pytest.mark.parametrize("settings, message", [
    ([], "data.streaming: needs train.max_steps"),
    (["train.max_steps=2", "data.train={a: {path: json, split: train}, b: {path: json, split: train}}"],
     "data.streaming: reads one dataset"),
    (["train.max_steps=2", "loss.teacher.model=data"], "data.streaming: not with loss.teacher"),
])
def test_what_a_stream_cannot_do_is_refused_at_config_load(settings, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["data.streaming=true", *settings])


@pytest.mark.parametrize("recipe, workers", [("sts", 0), ("nli", 2)])
def test_a_streamed_run_trains_as_the_map_style_run(tmp_path, tiny_model_dir, recipe, workers):
    """Same batches, same collated tensors (tokenised in the collator, in DataLoader workers too): same weights."""
    if recipe == "sts":
        spec = f"{{path: csv, data_files: {{train: {STSB}/train.csv}}, split: 'train[:64]', score_max: 5}}"
        settings = [f"data.train={spec}", "train.batch_size=8", "train.max_steps=3"]
    else:
        settings = ["data.train={path: sentence-transformers/all-nli, name: triplet, split: 'train[:200]'}",
                    "train.batch_size=16", "train.max_steps=3"]
    weights = {}
    for streaming in (False, True):
        out = tmp_path / str(streaming)
        proc = run_nli_recipe(out, "configs/nli-matryoshka.yaml" if recipe == "nli" else "configs/default.yaml",
                              tiny_model_dir, *settings, f"data.streaming={streaming}", f"data.num_workers={workers}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[streaming] = load_file(str(out / "run" / "model" / "model.safetensors"))
        assert json.loads((out / "run" / "results.json").read_text())["train"]["steps"] == 3
    assert weights[True].keys() == weights[False].keys()
    assert all(weights[True][k].equal(weights[False][k]) for k in weights[True])


def test_a_streamed_run_resumes_where_the_uninterrupted_run_would_be(tmp_path, tiny_model_dir):
    stream = ["data.streaming=true", "data.shuffle_buffer=24", "train.max_steps=4"]  # 64 rows: 3 windows
    whole = run_train(tmp_path / "whole", tiny_model_dir, *stream, "train.save_every=2")
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed = run_train(tmp_path / "resumed", tiny_model_dir, *stream,
                        resume=tmp_path / "whole" / "run" / "checkpoints" / "step_2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    torch.testing.assert_close(encode_saved(tmp_path / "resumed" / "run" / "model"),
                               encode_saved(tmp_path / "whole" / "run" / "model"), rtol=0, atol=1e-6)
