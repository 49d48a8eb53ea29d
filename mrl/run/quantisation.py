"""Quantisation-aware training's run side (loss.quantisation; the loss is mrl.loss.quantisation): the int8 / int4
ranges, calibrated once before training, and the record the saved model folder keeps of what it was trained for.

A resumed run does not calibrate again: its ranges come from the checkpoint (a buffer of the loss).
"""

import random
from itertools import accumulate

import torch

from mrl.data.tables import text_columns
from mrl.loss.quantisation import LARGEST_CODE, precision_weights
from mrl.run.config import named_specs

RECORD = "quantisation.json"  # in the saved model folder


def calibration_texts(cfg, tables: dict, model) -> list[tuple[str, str]]:
    """loss.quantisation.calibration_rows distinct (prompt, text) pairs of the training tables (all of them if fewer),
    each text with the prompt its column trains with ("" for none). Text cells are drawn uniformly without
    replacement with train.seed and repeats skipped, so only the drawn cells are read, not every text of a large
    table; a streamed table (data.streaming) gives its first distinct texts, in the order it is read."""
    n, specs, columns = cfg.loss.quantisation.calibration_rows, named_specs(cfg.data.train), []
    for name, table in tables.items():
        prompts, _ = model.column_prompts(specs[name].get("prompts", cfg.data.prompts))
        columns += [(prompts.get(column, ""), table, column) for column in text_columns(table)]
    pairs: dict[tuple[str, str], None] = {}
    if cfg.data.streaming:  # one mrl.data.stream.Stream (never a mixture)
        rows = iter(columns[0][1])
        while len(pairs) < n and (row := next(rows, None)) is not None:
            pairs.update(dict.fromkeys((prompt, row[column]) for prompt, _, column in columns))
        return list(pairs)[:n]
    starts = list(accumulate((len(table) for _, table, _ in columns), initial=0))  # cell i: column k's row i - s_k
    rng, drawn = random.Random(cfg.train.seed), set()
    while len(pairs) < n and len(drawn) < starts[-1]:  # each round draws more than it needs, skipping drawn cells
        cells = [i for i in rng.sample(range(starts[-1]), min(starts[-1], len(drawn) + 2 * (n - len(pairs))))
                 if i not in drawn]
        drawn.update(cells)
        pairs.update(dict.fromkeys(read_cells(columns, starts, cells)))
    return list(pairs)[:n]


def read_cells(columns: list, starts: list[int], cells: list[int]) -> list[tuple[str, str]]:
    """The (prompt, text) of each cell, in the order given; each column's rows read in one select."""
    found = {}
    for k, (prompt, table, column) in enumerate(columns):
        rows = sorted(i - starts[k] for i in cells if starts[k] <= i < starts[k + 1])
        found.update(zip((starts[k] + row for row in rows), ((prompt, text) for text in table.select(rows)[column])))
    return [found[i] for i in cells]


def calibrate(objectives: list, model, cfg, tables: dict) -> None:
    """Set the ranges of every objective's quantised terms that need them (int8, int4; not with a fixed
    loss.quantisation.range): each coordinate's max |x| over the calibration texts embedded by `model` (the
    initial one) at full width, unit-normalised. Every process computes the same ranges."""
    quantised = [o.quantised for o in dict.fromkeys(objectives) if o.quantised is not None and o.quantised.needs_ranges]
    if not quantised or cfg.loss.quantisation.range is not None:
        return
    by_prompt: dict[str, list[str]] = {}
    for prompt, text in calibration_texts(cfg, tables, model):
        by_prompt.setdefault(prompt, []).append(text)
    unit = torch.cat([model.encode(texts, batch_size=cfg.eval.batch_size, prompt=prompt)  # (N, D), unit norm
                      for prompt, texts in by_prompt.items()])
    for loss in quantised:
        loss.calibrate(unit)


def quantisation_record(cfg, quantised) -> dict:
    """model/quantisation.json: the precisions the model was trained for, their weights and levels, the ranges of
    int8 / int4 (one per coordinate, at full width) and where they came from, the regulariser."""
    settings = cfg.loss.quantisation
    weights = {p: w for p, w in precision_weights(settings).items() if w > 0}
    ranges_from = (f"fixed: loss.quantisation.range = {settings.range}" if settings.range is not None else
                   f"calibrated: each coordinate's max |x| over {settings.calibration_rows} training texts (or all, if "
                   "fewer), embedded by the initial model at full width and unit-normalised")
    return {"precisions": list(weights), "weights": weights,
            "levels": {p: 2 * LARGEST_CODE[p] + 1 if p in LARGEST_CODE else 2 for p in weights},
            "scheme": "symmetric codes per coordinate, ranges fixed at full width: a d-dim prefix is stored as the "
                      "first d codes; binary: 1 where x > 0",
            "ranges": quantised.ranges.tolist() if quantised.needs_ranges else None,
            "ranges_from": ranges_from if quantised.needs_ranges else None,
            "regulariser": settings.regulariser, "regulariser_weight": settings.regulariser_weight}
