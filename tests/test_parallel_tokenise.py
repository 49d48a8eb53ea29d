"""Tokenising and checking a training table in several processes (data.num_proc, datasets.map): the same token
ids and text hashes as one process, read from the datasets cache on the next run, and an empty text found in a
worker still named by its row in the whole table."""

import json

import datasets
import pytest

import mrl.data.tables
from mrl.data import Collator, load_table, text_keys


@pytest.fixture
def pairs(tmp_path, monkeypatch):
    """A json file of 2,000 pairs (some texts repeated), a datasets cache of its own, and 500 rows a worker."""
    monkeypatch.setattr(mrl.data.tables, "ROWS_PER_WORKER", 500)  # so that 2,000 rows make 2 and more workers
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"anchor": f"a dog number {i % 700}", "positive": f"it barks {i} times"})
                              for i in range(2000)), encoding="utf-8")
    return {"path": "json", "data_files": {"train": str(path)}, "split": "train"}


def test_the_workers_give_the_tokens_and_hashes_of_one_process(pairs, tiny_encoder, tmp_path):
    collate = Collator(["anchor", "positive"], tiny_encoder.tokenizer, 12, prompts={"anchor": "query: "})
    table = load_table({**pairs, "cache_dir": str(tmp_path / "one")}, "data.train", num_proc=1)
    one = collate.pretokenize(table, num_proc=1, keys=True)
    several_cache = {**pairs, "cache_dir": str(tmp_path / "several")}  # (else it would read one's cache file)
    several = collate.pretokenize(load_table(several_cache, "data.train", num_proc=3), num_proc=3, keys=True)
    # (as the next run would: before this test's own calls of the tokenizer below, since datasets 4.2 keys its cache
    # by the tokenizer's pickle, which holds the truncation its last call left; later releases leave that out)
    again = collate.pretokenize(load_table(several_cache, "data.train", num_proc=3), num_proc=3, keys=True)
    assert again.cache_files == several.cache_files  # the next run reads the workers' files, tokenising nothing
    written = [[f["filename"] for f in t.cache_files if "/cache-" in f["filename"]] for t in (one, several)]
    assert len(written[0]) == 1 and len(written[1]) == 3  # one file a worker: the ids and hashes alone
    assert len(one.cache_files) == 2  # beside the table's own file
    assert one.features == several.features and one.column_names[:2] == ["anchor", "positive"]
    for column in one.column_names:
        assert one[column][:] == several[column][:], column
    expected = [tiny_encoder.tokenizer("query: " + t, truncation=True, max_length=12)["input_ids"]
                for t in table["anchor"][:]]
    assert one["anchor.ids"][:] == expected
    assert one["positive.key"][:] == text_keys([[t] for t in table["positive"][:]])[:, 0].tolist()


def test_an_empty_text_found_by_a_worker_is_named_by_its_row(pairs, tmp_path):
    rows = [{"anchor": f"a{i}", "positive": "  " if i == 1700 else f"p{i}"} for i in range(2000)]
    path = tmp_path / "empty.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)), encoding="utf-8")
    spec = {**pairs, "data_files": {"train": str(path)}}
    with pytest.raises(ValueError, match=r"column 'positive' row 1700 is empty or not text: '  '"):
        load_table(spec, "data.train", num_proc=4)


def test_workers_follow_the_rows_and_the_cores(monkeypatch):
    monkeypatch.setattr(mrl.data.tables, "ROWS_PER_WORKER", 20_000)
    workers = mrl.data.tables.map_workers
    assert workers(1, 10**6) is None and workers(8, 30_000) is None  # None: in this process
    assert workers(8, 10**6) == 8 and workers(8, 60_000) == 3
    monkeypatch.setattr(mrl.data.tables.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert workers(None, 10**6) == 2  # None: the cores this process may use


@pytest.mark.parametrize("kind", ["minilm", "minilm-left-truncation", "decoder-with-eos"])
def test_the_rust_tokenizer_gives_the_ids_of_the_tokenizer_call(kind, minilm_dir, tiny_decoder_dir):
    """ids_of (encode_batch_fast on a copy of the Rust tokenizer) equals tokenizer(texts, truncation=True,
    max_length=m): special tokens, truncation on either side, a post-processor that appends EOS, non-ASCII text."""
    from mrl.data.batches import ids_of
    from mrl.model.encoder import Encoder
    decoder = kind.startswith("decoder")
    model = Encoder.from_pretrained(str(tiny_decoder_dir if decoder else minilm_dir),
                                    **({"pooling": "lasttoken", "append_eos": True} if decoder else {}))
    tokenizer = model.tokenizer
    if kind == "minilm-left-truncation":
        tokenizer.truncation_side = "left"
    texts = ["a dog", "Ünïcödé façade — naïve café 東京 🙂", "query: " + "a long sentence of many words " * 20,
             "two  spaces\tand a tab", "x"]
    for max_length in (8, 64, 512):
        expected = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        tokenizer(texts, padding=True)  # (leaves the Rust tokenizer padding, not truncating: ids_of must set both)
        token_ids = ids_of(tokenizer, max_length)
        assert token_ids(texts) == expected, max_length
        assert max(map(len, expected)) == min(max_length, max(map(len, tokenizer(texts)["input_ids"])))


def test_a_tokenizer_without_a_rust_one_is_called_itself():
    from mrl.data.batches import ids_of
    calls = []

    class Slow:
        is_fast = False

        def __call__(self, texts, **kwargs):
            calls.append(kwargs)
            return {"input_ids": [[len(t)] for t in texts]}
    assert ids_of(Slow(), 7)(["ab", "c"]) == [[2], [1]]
    assert calls[0]["truncation"] is True and calls[0]["max_length"] == 7


def test_the_caches_are_written_in_large_record_batches(pairs, tiny_encoder, tmp_path, monkeypatch):
    """A process that opens a memory-mapped cache reads every record batch's header (and the kernel maps 64 KB
    around each): the loaded table comes in batches of BATCH_ROWS rows, the token ids in batches of MAP_BATCH."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import mrl.data.batches
    monkeypatch.setattr(mrl.data.tables, "BATCH_ROWS", 800)
    monkeypatch.setattr(mrl.data.batches, "MAP_BATCH", 300)
    table = load_table(pairs, "data.train", num_proc=1)  # 2,000 rows: datasets' own batches would be 1,000 rows
    assert [len(b) for b in table.data.to_batches()] == [800, 800, 400]
    tokenised = Collator(["anchor", "positive"], tiny_encoder.tokenizer, 12).pretokenize(table, num_proc=1, keys=True)
    assert [len(b) for b in tokenised.data.table.column("anchor.ids").chunks] == [300] * 6 + [200]
    (tmp_path / "folder").mkdir()
    path = tmp_path / "folder" / "pairs.parquet"
    pq.write_table(pa.table({"anchor": table["anchor"][:], "positive": table["positive"][:]}), path)
    assert "fragment_scan_options" not in mrl.data.tables.cache_options(pairs)  # a parquet option only
    for spec in ({"path": "parquet", "data_files": {"train": str(path)}, "split": "train"},
                 {"path": str(path.parent), "split": "train"}):  # a folder of parquet files: the same options
        options = mrl.data.tables.cache_options(spec)
        assert options["fragment_scan_options"].pre_buffer is False  # pyarrow's pre-buffering holds what it read
        parquet = load_table(spec, "data.train")
        assert parquet["anchor"][:] == table["anchor"][:] and len(parquet.data.to_batches()) == 3
    (path.parent / "more.jsonl").write_text('{"anchor": "a", "positive": "b"}\n')  # a folder of mixed files: not parquet
    assert "fragment_scan_options" not in mrl.data.tables.cache_options({"path": str(path.parent), "split": "train"})
