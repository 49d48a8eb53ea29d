"""Training and evaluation tables through `datasets`: a dataset spec in, a checked table out.

A dataset spec is the keyword arguments of `datasets.load_dataset` (path, name, data_files, split, ...)
plus three keys of ours:
    columns:   the text columns, in order; default: every string column except the label, in table order
    label:     the label column; default: `score` or `label` if the table has one
    score_max: divide labels by this (e.g. 5 for STS-B scored in [0, 5]); default: labels as they are
Column convention (as in the ecosystem): first text column the anchor, second its positive, any further
columns hard negatives; or two sentences and a score for CoSENT.
"""

import array
import gzip
import math
import os

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds

from mrl.sources import check_local_files, data_file_paths, local_files, resolve_dataset, unreachable

OUR_KEYS = ("columns", "label", "score_max", "loss", "prompts", "weight")  # the last three: mixtures
LABEL = "label"  # the label column is renamed to this; every other column of a loaded table is text
IDS = ".ids"  # `<column>.ids`: the token ids of a text column, added by Collator.pretokenize
KEY = ".key"  # `<column>.key`: a 64-bit hash of each text (no-duplicates batches), added by Collator.pretokenize
ROWS_PER_WORKER = 20_000  # the fewest rows worth a process of their own in datasets.map (map_workers)
BATCH_ROWS = 100_000  # rows per record batch of a table's datasets cache (datasets' default: 1000); see cache_options
TEACHER = ".teacher"  # `<column>.teacher`: a teacher's embedding of each text of the column (loss.teacher)


def load_table(spec: dict, field: str, needs_label: bool = False, mirror: dict | None = None,
               num_proc: int | None = 1) -> datasets.Dataset:
    """Load a spec into a Dataset whose columns are the text columns, in order, then `label` if it is needed.

    A hub id with a local copy in `mirror` (see mrl.sources) is read from that copy. `field` is the config
    name of the spec, used in every error. num_proc: processes that check the texts (None: the machine's
    cores; see map_workers).
    """
    table, spec = open_dataset(spec, field, mirror)
    if len(table) == 0:
        raise ValueError(f"{field}: the dataset {spec.get('path')!r} split {spec['split']!r} has no rows")
    columns, label = pick_columns(spec, field, table.features, needs_label)
    where = f"{field} ({source_files(spec)})"
    check_texts(table, columns, where, num_proc)

    teacher = [c + TEACHER for c in columns if c + TEACHER in table.column_names]  # stored teacher embeddings
    table = table.select_columns(columns + teacher + ([label] if needs_label else []))
    if needs_label:
        scale, scores = float(spec.get("score_max") or 1.0), array.array("d")
        for chunk in table.with_format("arrow")[:][label].chunks:  # 8 bytes a row, not a Python float
            offset = len(scores)
            scores.extend([score(v, scale, f"{where}: column {label!r} row {offset + i}")
                           for i, v in enumerate(chunk.to_pylist())])
        scores = np.frombuffer(scores, dtype=np.float64)
        outside = next(iter(np.flatnonzero(~((scores >= 0) & (scores <= 1))).tolist()), None)
        if outside is not None:
            raise score_outside(where, label, outside, table[outside][label], scores[outside], scale, field)
        table = table.remove_columns([label]).add_column(LABEL, scores)
    return table


def open_dataset(spec: dict, field: str, mirror: dict | None, streaming: bool = False) -> tuple:
    """(datasets.load_dataset of a spec: a Dataset, an IterableDataset with streaming; the spec with a hub id
    resolved through the mirror), its errors naming the field."""
    if "split" not in spec:
        raise ValueError(f"{field}.split: which split to use (e.g. train, validation, test)")
    check_local_files(spec, field)
    spec = resolve_dataset(spec, mirror or {})
    load_kwargs = {k: v for k, v in spec.items() if k not in OUR_KEYS}
    if not streaming:  # (a stream has no cache, and is read once, as it trains: a file that is not UTF-8 fails there)
        check_utf8(spec, field)
        load_kwargs = {**cache_options(spec), **load_kwargs}  # the spec's own keys win
    try:
        dataset = datasets.load_dataset(**load_kwargs, **({"streaming": True} if streaming else {}))
    except Exception as error:
        if "/" in spec["path"] and not os.path.exists(spec["path"]):  # a hub id that could not be fetched
            raise unreachable("dataset", spec["path"], mirror or {}, error) from error
        if isinstance(error, StopIteration) or "corresponds to no data" in str(error):  # datasets' "empty"
            raise ValueError(f"{field}: the dataset {spec.get('path')!r} split {spec['split']!r} has no rows "
                             f"(data_files: {spec.get('data_files')!r})") from error
        raise ValueError(f"{field}: datasets.load_dataset({_show(load_kwargs)}) failed: "
                         f"{type(error).__name__}: {error}") from error
    # a first load converts the files into datasets' arrow cache through pyarrow's allocator, which keeps what it
    # freed (0.4 GB after a 1M-row parquet file): given back, so start-up memory is that of the memory-mapped table
    pa.default_memory_pool().release_unused()
    return dataset, spec


def cache_options(spec: dict) -> dict:
    """load_dataset options that keep the memory of converting a table into datasets' arrow cache, and of reading
    it, flat in the number of rows.
    writer_batch_size=BATCH_ROWS: every process that opens the memory-mapped cache reads each record batch's
        header, and the kernel maps the 64 KB around each page it reads (fault-around): datasets' 1000-row batches
        put 0.65 GB of a 10M-row table's file into each such process's resident memory, 100k-row batches 7 MB.
    fragment_scan_options (parquet files only): pyarrow's pre-buffered parquet scan holds what it has read until
        the scan ends (apache/arrow#39808): 2.3 GB at the peak converting a 1.6 GB, 10M-row file; without
        pre-buffering, 1.0 GB, and faster (the files are on local disk by then: load_dataset downloads first).
        Parquet is known by the spec: path "parquet", data_files all *.parquet, or a local folder of only parquet
        files (besides hidden files and a README); a hub id's builder is not known before loading, and converts
        with pre-buffering."""
    files = data_file_paths(spec.get("data_files"))
    if not files and os.path.isdir(spec["path"]):
        files = [f for _, _, names in os.walk(spec["path"]) for f in names
                 if not f.startswith(".") and f.lower() != "readme.md"]
    parquet = spec["path"] == "parquet" or bool(files) and all(f.endswith(".parquet") for f in files)
    return {"writer_batch_size": BATCH_ROWS,
            **({"fragment_scan_options": pds.ParquetFragmentScanOptions(pre_buffer=False)} if parquet else {})}


def pick_columns(spec: dict, field: str, features: dict, needs_label: bool) -> tuple[list[str], str | None]:
    """(the text columns, the label column or None) of a table with these features ({name: datasets feature})."""
    names = list(features)
    label = spec.get("label") or next((c for c in ("score", "label") if c in names), None)
    if label is not None and label not in names:
        raise ValueError(f"{field}.label: no column {label!r}; the table has {names}")
    if needs_label and label is None:
        raise ValueError(f"{field}.label: this loss needs a score column, and the table has none of "
                         f"score/label among {names}")
    columns = spec.get("columns") or [c for c, t in features.items()
                                      if c != label and getattr(t, "dtype", None) in ("string", "large_string")]
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{field}.columns: no column {missing} in the table; it has {names}")
    if len(columns) < 2:
        raise ValueError(f"{field}.columns: need at least two text columns, found {columns} in {names}")
    return columns, label


def score_outside(where: str, label: str, row: int, value, scaled: float, scale: float, field: str) -> ValueError:
    """The error for a score outside [0, 1] after dividing by score_max, naming the row and the fix."""
    return ValueError(f"{where}: column {label!r} row {row}: the score {value!r} is {scaled:g} after dividing by "
                      f"score_max={scale:g}, outside [0, 1]; set {field}.score_max to the scale's maximum (e.g. 5 for "
                      "STS-B scored 0..5)")


def check_texts(table: datasets.Dataset, columns: list[str], where: str, num_proc: int | None = 1) -> None:
    """Fail naming the column and row of the first empty or non-text cell found: by datasets.map, in
    map_workers(num_proc) processes (which read the table, so this process does not page it in), writing nothing."""
    for c in columns:
        if getattr(table.features[c], "dtype", None) not in ("string", "large_string"):
            raise ValueError(f"{where}: column {c!r} row 0 is empty or not text: {table[0][c]!r}")

    def first_empty(*texts_and_indices) -> None:  # each column's texts of a batch, then the rows' indices
        *texts, indices = texts_and_indices
        for c, column in zip(columns, texts):
            for t, i in zip(column, indices):
                if empty_or_not_text(t):
                    raise ValueError(f"{where}: column {c!r} row {i} is empty or not text: {t!r}")
    table.map(first_empty, batched=True, batch_size=10_000, with_indices=True, input_columns=columns,
              num_proc=map_workers(num_proc, len(table)), desc="check texts")


def empty_or_not_text(t) -> bool:
    """A cell no text column may hold: None, not a string, empty, or only whitespace (as str.strip sees it)."""
    return not isinstance(t, str) or not t or t.isspace()


def map_workers(num_proc: int | None, n_rows: int) -> int | None:
    """The processes datasets.map runs in: num_proc (None: the cores this process may use), but no more than one
    per ROWS_PER_WORKER rows (starting a process costs more than it saves below that); None for one, which runs
    in this process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(num_proc or cores, n_rows // ROWS_PER_WORKER)
    return workers if workers > 1 else None


def score(value, scale: float, where: str) -> float:
    """A label as a float divided by `scale`, or an error naming where it is and what it holds."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = math.nan
    if isinstance(value, bool) or not math.isfinite(score):
        raise ValueError(f"{where}: the score {value!r} is not a number")
    return score / scale


def source_files(spec: dict) -> str:
    """Where a spec's rows come from, for error messages: its data files, else its path."""
    files = spec.get("data_files")
    if isinstance(files, dict):
        files = files.get(spec["split"].split("[")[0], files)
    return str(files if files else spec["path"])


def check_utf8(spec: dict, field: str) -> None:
    """Fail naming the file, line and bytes if a local text data file (csv, json, jsonl, txt; gzipped too) is
    not UTF-8, before `datasets` reads it into an error that names neither."""
    for path in local_files(spec.get("data_files")):
        if not os.path.isfile(path) or not path.removesuffix(".gz").endswith((".csv", ".tsv", ".json", ".jsonl", ".txt")):
            continue
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(f"{field}.data_files: {path} line {number} is not UTF-8 (bytes "
                                     f"{line[error.start:error.end]!r}); re-save the file as UTF-8") from None


def _show(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def text_columns(table: datasets.Dataset) -> list[str]:
    return [c for c in table.column_names if c != LABEL and not c.endswith((IDS, KEY, TEACHER))]
