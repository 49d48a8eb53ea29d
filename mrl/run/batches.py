"""The training batches of a run's config: each training table checked against its loss and prompts, with
its batch sampler and collator, combined into one mixture (mrl.data.mixture; one dataset is a mixture of one).
"""

from mrl.data.batches import Collator, degenerate_data
from mrl.data.mixture import MixtureBatchSampler, MixtureCollator, MixtureTable
from mrl.data.sampler import BatchSampler, shared_texts
from mrl.data.stream import Stream, StreamBatchSampler, StreamRows
from mrl.data.tables import KEY, LABEL, TEACHER, load_table, text_columns
from mrl.model.load import load_encoder
from mrl.run.config import (ModelConfig, check_train_columns, dataset_field, dataset_loss, dataset_losses, named_specs,
                            uses_no_duplicates)


def training_tables(cfg, mirror: dict) -> dict:
    """{name: table} of data.train (one dataset: {"train": table}), each loaded and checked (mrl.data.load_table);
    a CoSENT dataset needs its label column. Their texts are checked in data.num_proc processes. With
    data.streaming, {"train": mrl.data.stream.Stream}, checked as it is read."""
    specs = named_specs(cfg.data.train)
    if cfg.data.streaming:  # read as it trains (mrl/data/stream.py); one dataset
        return {name: Stream(spec, "data.train", loss == "cosent", mirror)
                for (name, spec), loss in zip(specs.items(), dataset_losses(cfg))}
    return {name: load_table(spec, dataset_field(name, specs), loss == "cosent", mirror, cfg.data.num_proc)
            for (name, spec), loss in zip(specs.items(), dataset_losses(cfg))}


def eval_tables(cfg, mirror: dict) -> dict:
    """{split: table} of eval.dev and eval.test, those that are set; scored pairs (STS)."""
    splits = {"dev": cfg.eval.dev, "test": cfg.eval.test}
    return {split: load_table(spec, f"eval.{split}", True, mirror) for split, spec in splits.items() if spec is not None}


def describe(table) -> str:
    """'5749 rows, text columns [...], label in [0, 1]': what start-up prints of each table."""
    rows = "streamed" if isinstance(table, Stream) else f"{len(table)} rows"
    return f"{rows}, text columns {text_columns(table)}" + (", label in [0, 1]" if LABEL in table.column_names else "")


def training_batches(cfg, tables: dict, model, processes: int, mirror: dict | None = None, device=None):
    """(table, batch sampler, collator, warnings) for the training tables, each checked against its loss and
    prompts (mrl.run.config.check_train_columns): each dataset its own no-duplicates batches (on for a contrastive
    loss unless data.no_duplicates says), prompts and collator, its token ids (and, for no-duplicates batches,
    its texts' hashes) computed once up front in data.num_proc processes (cached), and with a teacher model
    (loss.teacher.model) its embedding of every text; the warnings of any dataset that trains little
    (mrl.data.degenerate_data) or leaves rows out of every epoch. Each sampler's first plan is made here, once."""
    if cfg.data.streaming:
        return stream_batches(cfg, tables, model, processes)
    specs, samplers, collators, warnings, tokenised = named_specs(cfg.data.train), [], [], [], []
    teacher = None
    if cfg.loss.teacher.model not in (None, "data"):  # loaded as it was saved (its own pooling, prompts, ...)
        teacher = load_encoder(ModelConfig(name=cfg.loss.teacher.model), mirror or {}).to(device or "cpu")
    for name, table in tables.items():
        collator, loss, no_duplicates = dataset_collator(cfg, name, specs[name], table, model)
        columns = collator.columns
        collators.append(collator)
        if cfg.loss.teacher.model is None:  # teacher embeddings in the data, but no teacher asked for: not used
            table = table.remove_columns([c + TEACHER for c in columns if c + TEACHER in table.column_names])
        if teacher is not None:  # its embeddings, computed once here: `<column>.teacher` (mrl.data.Collator)
            for c in columns:
                embeddings = teacher.encode(table.with_format("arrow")[:][c].to_pylist(), normalize=False)
                table = table.add_column(c + TEACHER, embeddings.tolist())
        if cfg.loss.teacher.model is not None and not all(c + TEACHER in table.column_names for c in columns):
            if len(tables) == 1:
                raise ValueError(f"loss.teacher: {name} has no teacher embeddings for its columns {columns} "
                                 f"(columns <column>.teacher, or a loss.teacher.model to compute them)")
            warnings.append(f"loss.teacher: {name} has no teacher embeddings (<column>.teacher) for {columns}: its "
                            "batches are not distilled")
        tokenised.append(collators[-1].pretokenize(table, cfg.data.num_proc, keys=no_duplicates))
        shared = shared_texts(key_chunks(tokenised[-1], columns)) if no_duplicates else None
        samplers.append(BatchSampler(len(table), cfg.train.batch_size, no_duplicates, cfg.train.drop_last,
                                     cfg.train.seed, processes, shared))
        warnings += [f"{name}: {w}" if len(tables) > 1 else w
                     for w in degenerate_data(table, loss, samplers[-1])]
    sampler = MixtureBatchSampler(samplers, [float(specs[name].get("weight", 1.0)) for name in tables],
                                  cfg.data.mixture, cfg.train.seed, processes)
    for d, name in enumerate(tables):
        if n := sampler.left_out(d):
            warnings.append(f"{dataset_field(name, tables)}: the last {n} row(s) of an epoch's shuffle are fewer "
                            f"than the {processes} processes and are left out of that epoch")
    return MixtureTable(tokenised), sampler, MixtureCollator(collators, list(tables)), warnings


def dataset_collator(cfg, name: str, spec: dict, table, model) -> tuple[Collator, str, bool]:
    """A training dataset's collator (its text columns, checked to suit its loss and its prompts), its loss, and
    whether its batches hold no duplicate texts."""
    columns = text_columns(table)
    check_train_columns(cfg, name, columns)
    loss = dataset_loss(spec, cfg.loss.name)
    collator = Collator(columns, model.tokenizer, model.max_seq_length, cfg.speed.pad_to_multiple_of,
                        *model.column_prompts(spec.get("prompts", cfg.data.prompts)))
    return collator, loss, uses_no_duplicates(cfg, loss)


def stream_batches(cfg, tables: dict, model, processes: int):
    """training_batches of one streamed table (data.streaming): rows read in windows of data.shuffle_buffer and
    batched as the map-style path batches them (mrl/data/stream.py), tokenised in the collator; no warnings."""
    (name, stream), = tables.items()
    collator, _, no_duplicates = dataset_collator(cfg, name, named_specs(cfg.data.train)[name], stream, model)
    sampler = StreamBatchSampler(stream, cfg.train.batch_size, no_duplicates, cfg.train.drop_last, cfg.train.seed,
                                 processes, cfg.data.shuffle_buffer,
                                 length=cfg.train.max_steps * processes * cfg.train.grad_accum)
    return StreamRows(), sampler, MixtureCollator([collator], [name]), []


def key_chunks(table, columns: list[str]) -> list[list]:
    """The `<column>.key` hashes that Collator.pretokenize wrote, per column, as numpy views of the memory-mapped
    table's chunks (nothing copied)."""
    data = table.with_format("arrow")[:]
    return [[chunk.to_numpy() for chunk in data[c + KEY].chunks] for c in columns]
