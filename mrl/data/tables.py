"""Training and evaluation tables through `datasets`: a dataset spec in, a checked table out.

A dataset spec is the keyword arguments of `datasets.load_dataset` (path, name, data_files, split, ...)
plus three keys of ours:
    columns:   the text columns, in order; default: every string column except the label, in table order
    label:     the label column; default: `score` or `label` if the table has one
    score_max: divide labels by this (e.g. 5 for STS-B scored in [0, 5]); default: labels as they are
Column convention (as in the ecosystem): first text column the anchor, second its positive, any further
columns hard negatives; or two sentences and a score for CoSENT.
"""

import gzip
import math
import os

import datasets

from mrl.sources import check_local_files, local_files, resolve_dataset, unreachable

OUR_KEYS = ("columns", "label", "score_max", "loss", "prompts", "weight")  # the last three: mixtures
LABEL = "label"  # the label column is renamed to this; every other column of a loaded table is text
IDS = ".ids"  # `<column>.ids`: the token ids of a text column, added by Collator.pretokenize
TEACHER = ".teacher"  # `<column>.teacher`: a teacher's embedding of each text of the column (loss.teacher)


def load_table(spec: dict, field: str, needs_label: bool = False, mirror: dict | None = None) -> datasets.Dataset:
    """Load a spec into a Dataset whose columns are the text columns, in order, then `label` if it is needed.

    A hub id with a local copy in `mirror` (see mrl.sources) is read from that copy. `field` is the config
    name of the spec, used in every error.
    """
    if "split" not in spec:
        raise ValueError(f"{field}.split: which split to use (e.g. train, validation, test)")
    check_local_files(spec, field)
    spec = resolve_dataset(spec, mirror or {})
    check_utf8(spec, field)
    load_kwargs = {k: v for k, v in spec.items() if k not in OUR_KEYS}
    try:
        table = datasets.load_dataset(**load_kwargs)
    except Exception as error:
        if "/" in spec["path"] and not os.path.exists(spec["path"]):  # a hub id that could not be fetched
            raise unreachable("dataset", spec["path"], mirror or {}, error) from error
        if isinstance(error, StopIteration) or "corresponds to no data" in str(error):  # datasets' "empty"
            raise ValueError(f"{field}: the dataset {spec.get('path')!r} split {spec['split']!r} has no rows "
                             f"(data_files: {spec.get('data_files')!r})") from error
        raise ValueError(f"{field}: datasets.load_dataset({_show(load_kwargs)}) failed: "
                         f"{type(error).__name__}: {error}") from error
    if len(table) == 0:
        raise ValueError(f"{field}: the dataset {spec.get('path')!r} split {spec['split']!r} has no rows")

    label = spec.get("label") or next((c for c in ("score", "label") if c in table.column_names), None)
    if label is not None and label not in table.column_names:
        raise ValueError(f"{field}.label: no column {label!r}; the table has {table.column_names}")
    if needs_label and label is None:
        raise ValueError(f"{field}.label: this loss needs a score column, and the table has none of "
                         f"score/label among {table.column_names}")
    columns = spec.get("columns") or [c for c, t in table.features.items()
                                      if c != label and getattr(t, "dtype", None) in ("string", "large_string")]
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{field}.columns: no column {missing} in the table; it has {table.column_names}")
    if len(columns) < 2:
        raise ValueError(f"{field}.columns: need at least two text columns, found {columns} in {table.column_names}")
    where = f"{field} ({_files(spec)})"
    for c in columns:
        empty = next((i for i, t in enumerate(table[c]) if not isinstance(t, str) or not t.strip()), None)
        if empty is not None:
            raise ValueError(f"{where}: column {c!r} row {empty} is empty or not text: {table[empty][c]!r}")

    teacher = [c + TEACHER for c in columns if c + TEACHER in table.column_names]  # stored teacher embeddings
    table = table.select_columns(columns + teacher + ([label] if needs_label else []))
    if needs_label:
        scale = float(spec.get("score_max") or 1.0)
        scores = [_score(v, scale, f"{where}: column {label!r} row {i}") for i, v in enumerate(table[label])]
        outside = next((i for i, y in enumerate(scores) if not 0 <= y <= 1), None)
        if outside is not None:
            raise ValueError(f"{where}: column {label!r} row {outside}: the score {table[outside][label]!r} is "
                             f"{scores[outside]:g} after dividing by score_max={scale:g}, outside [0, 1]; set "
                             f"{field}.score_max to the scale's maximum (e.g. 5 for STS-B scored 0..5)")
        table = table.remove_columns([label]).add_column(LABEL, scores)
    return table


def _score(value, scale: float, where: str) -> float:
    """A label as a float divided by `scale`, or an error naming where it is and what it holds."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = math.nan
    if isinstance(value, bool) or not math.isfinite(score):
        raise ValueError(f"{where}: the score {value!r} is not a number")
    return score / scale


def _files(spec: dict) -> str:
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
    return [c for c in table.column_names if c != LABEL and not c.endswith((IDS, TEACHER))]
