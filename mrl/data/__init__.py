"""Data: tables from dataset specs, their batches, mixtures of datasets, and mined hard negatives.

    tables.py    a dataset spec (datasets.load_dataset's arguments + columns, label, score_max) to a checked table
    sampler.py   BatchSampler: an epoch's batches (no duplicate texts in one) planned once, as arrays
    batches.py   Collator (tokenise once, in parallel; pad per batch), chunks, degenerate data
    mixture.py   several datasets in one run, each batch from one of them
    stream.py    a training table read as it trains (data.streaming), batched as the map-style path batches it
    mine.py      hard negatives mined with a model's embeddings (python -m mrl.data.mine)
"""

from mrl.data.batches import Collator, chunk_features, degenerate_data, pad_columns, padded_length
from mrl.data.sampler import BatchSampler, text_keys
from mrl.data.tables import IDS, LABEL, OUR_KEYS, TEACHER, check_utf8, load_table, text_columns

__all__ = ["BatchSampler", "Collator", "chunk_features", "degenerate_data", "pad_columns", "padded_length", "IDS",
           "LABEL", "OUR_KEYS", "TEACHER", "check_utf8", "load_table", "text_columns", "text_keys"]
