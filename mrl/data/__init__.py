"""Data: tables from dataset specs, their batches, mixtures of datasets, and mined hard negatives.

    tables.py    a dataset spec (datasets.load_dataset's arguments + columns, label, score_max) to a checked table
    batches.py   BatchSampler (no duplicate texts in a batch), Collator (tokenise once, pad per batch), chunks
    mixture.py   several datasets in one run, each batch from one of them
    mine.py      hard negatives mined with a model's embeddings (python -m mrl.data.mine)
"""

from mrl.data.batches import (BatchSampler, Collator, chunk_features, degenerate_data, pad_columns,
                              padded_length)
from mrl.data.tables import IDS, LABEL, OUR_KEYS, TEACHER, check_utf8, load_table, text_columns

__all__ = ["BatchSampler", "Collator", "chunk_features", "degenerate_data", "pad_columns", "padded_length", "IDS",
           "LABEL", "OUR_KEYS", "TEACHER", "check_utf8", "load_table", "text_columns"]
