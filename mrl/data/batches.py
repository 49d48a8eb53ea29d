"""Batches of a training table, tokenised once and padded per batch (Collator), and cut into chunks
(GradCache) or padded to fixed shapes (torch.compile); their rows come from mrl.data.sampler.
"""

import copy

import datasets
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import Tensor

from mrl.data.sampler import BatchSampler, text_keys
from mrl.data.tables import IDS, KEY, LABEL, TEACHER, map_workers

MAP_BATCH = 10_000  # rows a tokenising worker takes at a time, and rows per record batch of the token ids it writes


class Collator:
    """Rows -> one tokenised batch of every text column, column after column (one encoder forward for all),
    padded (on the tokenizer's padding side) to this batch's longest text; plus the labels, if the table has them.

    Rows of a table made by `pretokenize` bring their token ids, and are only padded here (tokenising once
    up front takes the tokenizer out of every step); other rows are tokenised here. Both give the same batch.
    pad_to_multiple_of=m pads further, up to a multiple of m tokens but at most max_length, so that batches
    come in a few shapes (for torch.compile and CUDA graphs); the extra columns are masked padding.
    prompts: {column: text} prepended to that column's texts; prompt_lengths: {column: the prompt's tokens},
    given to the encoder as `prompt_length` (k·B,), to leave them out of the pooled embedding if it does.
    """

    def __init__(self, columns: list[str], tokenizer, max_length: int, pad_to_multiple_of: int | None = None,
                 prompts: dict[str, str] | None = None, prompt_lengths: dict[str, int] | None = None):
        self.columns, self.tokenizer, self.max_length = columns, tokenizer, max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.prompts, self.prompt_lengths = prompts or {}, prompt_lengths or {}

    def texts(self, column: str, texts: list[str]) -> list[str]:
        return [self.prompts.get(column, "") + t for t in texts]

    def pretokenize(self, table: datasets.Dataset, num_proc: int | None = 1, keys: bool = False) -> datasets.Dataset:
        """The table plus the token ids of every text column (`<column>.ids`, int32) and, with keys, a 64-bit hash
        of each text (`<column>.key`, for no-duplicates batches: mrl.data.sampler), by datasets.map in
        map_workers(num_proc) processes (the same ids as one process: each tokenises a contiguous part), cached on
        disk for a file-backed table, so later runs read them. Only the new columns are written; the table's own
        stay where they are, beside them (concatenated by column, both memory-mapped)."""
        token_ids = ids_of(self.tokenizer, self.max_length)

        def encode(rows: dict) -> dict:
            ids = {c + IDS: token_ids(self.texts(c, rows[c])) for c in self.columns}
            return {**ids, **({c + KEY: text_keys([[t] for t in rows[c]])[:, 0] for c in self.columns} if keys else {})}
        features = datasets.Features({c + IDS: datasets.List(datasets.Value("int32")) for c in self.columns})  # int32:
        features.update({c + KEY: datasets.Value("uint64") for c in self.columns} if keys else {})  # half the disk
        new = table.map(encode, batched=True, batch_size=MAP_BATCH, writer_batch_size=MAP_BATCH, features=features,
                        remove_columns=table.column_names, num_proc=map_workers(num_proc, len(table)), desc="tokenise")
        return datasets.concatenate_datasets([table, new], axis=1)

    def __call__(self, rows: list[dict]) -> dict[str, Tensor]:
        if self.columns[0] + IDS in rows[0]:
            ids = [torch.tensor(row[c + IDS]) for c in self.columns for row in rows]  # column-major: (k·B,)
            left = self.tokenizer.padding_side == "left"
            input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=self.tokenizer.pad_token_id,
                                                        padding_side="left" if left else "right")
            lengths, positions = torch.tensor([len(i) for i in ids]), torch.arange(input_ids.shape[1])
            batch = {"input_ids": input_ids}
            if "token_type_ids" in self.tokenizer.model_input_names:
                batch["token_type_ids"] = torch.zeros_like(input_ids)
            real = positions >= input_ids.shape[1] - lengths[:, None] if left else positions < lengths[:, None]
            batch["attention_mask"] = real.long()
        else:
            texts = [t for c in self.columns for t in self.texts(c, [row[c] for row in rows])]  # column-major
            batch = dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                        return_tensors="pt"))
        if self.pad_to_multiple_of:
            batch = pad_columns(batch, padded_length(batch["input_ids"].shape[1], self.pad_to_multiple_of,
                                                     self.max_length), self.tokenizer.pad_token_id,
                                self.tokenizer.padding_side)
        if self.prompt_lengths:
            batch["prompt_length"] = torch.tensor([self.prompt_lengths.get(c, 0) for c in self.columns
                                                   for _ in rows])
        if LABEL in rows[0]:
            batch["labels"] = torch.tensor([row[LABEL] for row in rows], dtype=torch.float32)
        if self.columns[0] + TEACHER in rows[0]:  # (k·B, D_t), column-major as the texts
            batch["teacher"] = torch.tensor([row[c + TEACHER] for c in self.columns for row in rows])
        return batch


def ids_of(tokenizer, max_length: int):
    """texts -> the token ids that tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] gives
    (special tokens added, cut on the tokenizer's truncation side). A fast tokenizer's Rust tokenizer, copied and
    set to truncate the same way, gives them by encode_batch_fast, which computes no character offsets: 1.3x the
    rows per second of the tokenizer's own call (all-MiniLM-L6-v2, one core). Other tokenizers: their own call."""
    if not getattr(tokenizer, "is_fast", False):
        return lambda texts: tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False,
                                       return_token_type_ids=False)["input_ids"]
    rust = copy.deepcopy(tokenizer.backend_tokenizer)
    rust.no_padding()
    rust.enable_truncation(max_length, direction=tokenizer.truncation_side)
    return lambda texts: [encoding.ids for encoding in rust.encode_batch_fast(texts)]


def padded_length(length: int, multiple: int, limit: int) -> int:
    """`length` rounded up to a multiple of `multiple`, but not past `limit` (nor below `length`)."""
    return max(length, min(-(-length // multiple) * multiple, limit))


def pad_columns(features: dict[str, Tensor], length: int, pad_token_id: int, side: str = "right") -> dict[str, Tensor]:
    """A padded batch padded on to `length` columns on `side`: input ids with the pad token, the rest with 0."""
    extra = length - features["input_ids"].shape[1]
    widths = (extra, 0) if side == "left" else (0, extra)
    return {k: F.pad(v, widths, value=pad_token_id if k == "input_ids" else 0) if v.dim() == 2 else v
            for k, v in features.items()}


def chunk_features(features: dict[str, Tensor], rows: slice | Tensor,
                   pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """Rows of a tokenised batch, without the padding columns that no row of the chunk needs (at the end under
    right padding, at the start under left padding); with pad_to_multiple_of=m, keeping enough of them to make
    a multiple of m (at most the batch's width)."""
    chunk = {k: v[rows] for k, v in features.items()}
    mask = chunk["attention_mask"]
    width = mask.shape[1]
    used = mask.any(0).nonzero()
    start, end = int(used.min()), int(used.max()) + 1  # the columns that hold a real token of some row
    if pad_to_multiple_of:
        length = padded_length(end - start, pad_to_multiple_of, width)
        start, end = (start, start + length) if start == 0 else (end - length, end)  # right, or left, padding
    return {k: v[:, start:end] if v.dim() == 2 and v.shape[1] == width else v for k, v in chunk.items()}


def degenerate_data(table: datasets.Dataset, loss_name: str, sampler: BatchSampler) -> list[str]:
    """Warnings for a training table that trains little: nothing to rank, batches shrunk by no-duplicates."""
    warnings = []
    if loss_name == "cosent" and pc.count_distinct(table.with_format("arrow")[:][LABEL]).as_py() == 1:
        warnings.append(f"data.train: every pair has the same score ({table[0][LABEL]:g}): CoSENT has nothing to "
                        "rank, its loss is 0 and nothing trains")
    if sampler.no_duplicates:
        n_batches, n_small, smallest = sampler.shrunk_batches()
        if n_small >= max(1, n_batches // 10) and smallest < sampler.batch_size / 2:  # a tenth of them, halved
            warnings.append(f"data.no_duplicates: texts repeat in the table, so {n_small} of the {n_batches} batches "
                            f"of an epoch hold fewer than {sampler.batch_size} rows (the smallest {smallest}): fewer "
                            f"in-batch negatives")
    return warnings
