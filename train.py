"""Train a Matryoshka embedding model, top to bottom:
config -> accelerator -> model -> data -> loss -> optimiser -> prepare -> resume -> loop -> eval -> save.

    accelerate launch train.py                                   # configs/default.yaml
    accelerate launch train.py --config configs/nli-matryoshka.yaml --set train.lr=3e-5
    python train.py --set train.max_steps=20 --set output_dir=runs/smoke
    accelerate launch train.py --config ... --resume latest      # or --resume runs/x/checkpoints/step_100
"""

import argparse
import json
import math
import os
import shlex
import time
from functools import partial

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.utils import logging as hf_logging

from mrl.card import model_card
from mrl.config import load_config
from mrl.data import BatchSampler, Collator, embed_by_length, load_table, text_columns
from mrl.encoder import Encoder
from mrl.evaluation import evaluate_sts, markdown_table
from mrl.dist import gather_columns
from mrl.gradcache import cached_backward
from mrl.losses import NESTED_SCORES, losses_for
from mrl.matryoshka import Matryoshka2dLoss, MatryoshkaLoss, check_dims, check_n_layers_per_step
from mrl.sources import load_mirror, resolve_model, unreachable

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--config", default="configs/default.yaml", help="YAML file of changes to mrl/config.py")
parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-5")
parser.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest' (in output_dir/checkpoints)")
args = parser.parse_args()
cfg = load_config(args.config, args.set)  # every config error surfaces here, before anything is loaded

# cpu=True on a machine without a GPU: Accelerate then joins processes started by torchrun / `accelerate launch
# --multi_gpu` into one gloo group (left False, each CPU process would train alone)
# non_blocking: batches (pinned on a GPU, below) are copied to the device without waiting for it
accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum,
                          log_with=cfg.log.with_ or None, project_dir=cfg.output_dir,
                          cpu=not torch.accelerator.is_available(),
                          dataloader_config=DataLoaderConfiguration(non_blocking=True))
set_seed(cfg.train.seed)
hf_logging.disable_progress_bar()
accelerator.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
mirror = load_mirror(cfg.mirror)

# -- model: loaded first, so dims are checked against its width before any data is read
model_path = resolve_model(cfg.model.name, mirror)
try:
    model = Encoder.from_pretrained(model_path, max_seq_length=cfg.model.max_seq_length, normalize=cfg.model.normalize,
                                    dense_dim=cfg.model.dense_dim, dense_activation=cfg.model.dense_activation)
except OSError as error:  # what transformers raises for a hub id it cannot reach
    if os.path.isdir(model_path):  # a local folder that is broken: transformers' own error says how
        raise
    raise unreachable("model", cfg.model.name, mirror, error) from error
check_dims(cfg.loss.dims, embedding_dim=model.embedding_dim, field="loss.dims")
eval_dims = cfg.eval.dims or cfg.loss.dims
check_dims(eval_dims, embedding_dim=model.embedding_dim, field="eval.dims")
for n_layers in cfg.eval.layers or []:
    if not 1 <= n_layers <= model.num_layers:
        raise ValueError(f"eval.layers: {n_layers} is not in 1..{model.num_layers} (the model's layers)")
if cfg.loss.two_d:
    check_n_layers_per_step(cfg.loss.n_layers_per_step, model.num_layers)
accelerator.print(f"model: {model_path} ({model.embedding_dim} dims, max_seq_length {model.max_seq_length})")

# -- data: every table is loaded and checked before the first step
needs_label = cfg.loss.name == "cosent"
with accelerator.main_process_first():  # the first process fills the datasets cache, the others read it
    train_table = load_table(cfg.data.train, "data.train", needs_label, mirror)
    eval_tables = {split: load_table(spec, f"eval.{split}", True, mirror)
                   for split, spec in (("dev", cfg.eval.dev), ("test", cfg.eval.test)) if spec is not None}
columns = text_columns(train_table)
if cfg.loss.name == "cosent" and len(columns) != 2:
    raise ValueError(f"data.train.columns: cosent needs 2 text columns and a score, got {columns}")
for split, table in {"train": train_table, **eval_tables}.items():
    accelerator.print(f"{split}: {len(table)} rows, text columns {text_columns(table)}"
                      + (", label in [0, 1]" if "label" in table.column_names else ""))

no_duplicates = cfg.data.no_duplicates if cfg.data.no_duplicates is not None else cfg.loss.name == "contrastive"
rows = list(zip(*(train_table[c] for c in columns)))
sampler = BatchSampler(rows, cfg.train.batch_size, no_duplicates, cfg.train.drop_last, cfg.train.seed,
                       processes=accelerator.num_processes)
# the loader's own generator: starting an epoch's iterator then draws no number from the global RNG, so dropout
# after a resume (global RNG restored from the checkpoint) matches the uninterrupted run
collate = Collator(columns, model.tokenizer, model.max_seq_length, cfg.train.pad_to_multiple_of)
with accelerator.main_process_first():  # token ids once, up front (cached): no tokenizer in the training steps
    train_table = collate.pretokenize(train_table)
loader = DataLoader(train_table, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                    pin_memory=accelerator.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.train.seed))

# -- loss: the plain (baseline) loss is the Matryoshka loss with the full width as its only dim
# every dim's loss comes from one batched computation (prefix sums; equal to the per-dim loop, see the tests)
base_loss, nested_loss = losses_for(cfg.loss.name, cfg.loss.scale, cfg.loss.symmetric)
if cfg.loss.matryoshka:
    loss_fn = MatryoshkaLoss(base_loss, cfg.loss.dims, cfg.loss.dim_weights, cfg.loss.n_dims_per_step, nested_loss,
                             cfg.loss.dim_schedule, cfg.loss.always_full_dim, cfg.loss.distill_weight,
                             cfg.loss.distill_temperature, NESTED_SCORES[cfg.loss.name])
else:
    loss_fn = MatryoshkaLoss(base_loss, [model.embedding_dim], nested_loss=nested_loss)
if cfg.loss.two_d:
    loss_fn = Matryoshka2dLoss(loss_fn, cfg.loss.n_layers_per_step, cfg.loss.layer_weight, cfg.loss.kl_weight,
                               cfg.loss.kl_temperature)


def length_groups_for(n_texts: int) -> int:
    """train.length_groups, or by default 1 forward per batch on a GPU (launch-bound at small batches) and, on a
    CPU, where compute follows tokens, groups of about 32 texts, at least 2 (benchmarks/NOTES.md: the fastest
    for STS and NLI batches)."""
    if cfg.train.length_groups:
        return cfg.train.length_groups
    return 1 if accelerator.device.type == "cuda" else max(2, n_texts // 32)


length_groups = length_groups_for(cfg.train.batch_size * len(columns))  # of a full batch
cross_device = cfg.loss.cross_device
if cross_device is None:
    cross_device = cfg.loss.name == "contrastive" and accelerator.num_processes > 1
accelerator.print(f"loss: {loss_fn}" + (f", negatives from all {accelerator.num_processes} processes" if cross_device else "")
                  + (f", GradCache chunks of {cfg.train.cache_chunk_size} texts" if cfg.train.cache_chunk_size
                     else f", each batch embedded in {length_groups} length group(s)")
                  + (f", padded to multiples of {cfg.train.pad_to_multiple_of} tokens" if cfg.train.pad_to_multiple_of else "")
                  + (f", encoder compiled ({cfg.train.compile})" if cfg.train.compile else ""))


def compute_loss(embeddings: list[torch.Tensor], labels) -> tuple[torch.Tensor, dict]:
    """The (Matryoshka) loss of this process's embeddings, against every process's candidates if cross_device."""
    if cross_device:
        all_columns, own_rows = gather_columns(embeddings)
        return loss_fn(all_columns, labels, rows=own_rows)
    return loss_fn(embeddings, labels)


# -- optimiser and schedule (no weight decay on biases and LayerNorm weights, as in BERT)
trainable = [p for p in model.parameters() if p.requires_grad]
decay = [p for p in trainable if p.ndim >= 2]
no_decay = [p for p in trainable if p.ndim < 2]
loss_fn.to(accelerator.device)
loss_parameters = list(loss_fn.parameters())  # learned dim weights, if any: their own rate, no decay
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0},
                               {"params": loss_parameters, "weight_decay": 0.0, "lr": cfg.loss.dim_weight_lr}],
                              lr=cfg.train.lr, fused=accelerator.device.type in ("cuda", "cpu"))  # one kernel, not ~10 per tensor
steps_per_epoch = math.ceil(len(loader) / (accelerator.num_processes * cfg.train.grad_accum))
total_steps = min(cfg.train.epochs * steps_per_epoch, cfg.train.max_steps or math.inf)
# a prepared scheduler steps once per process per optimiser step, hence the factor
scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * total_steps) * accelerator.num_processes,
                                            total_steps * accelerator.num_processes)
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
# the training forward, compiled if asked (its backward then too); evaluation and saving use `model`, eager.
# One graph per batch shape: each padded length (pad_to_multiple_of keeps them few) in each length group, times
# a few batch sizes (an epoch's last batch); Dynamo's recompile limit (8 by default) is raised to cover them
forward = model
if cfg.train.compile:
    n_shapes = 4 * length_groups * math.ceil(collate.max_length / cfg.train.pad_to_multiple_of)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, n_shapes)
    forward = torch.compile(model, mode=cfg.train.compile, dynamic=False)
cuda_graphs = cfg.train.compile == "reduce-overhead" and accelerator.device.type == "cuda"


class Progress:
    """Where training stands; saved inside every checkpoint, so resuming never parses folder names."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


progress = Progress()
accelerator.register_for_checkpointing(progress)
accelerator.register_for_checkpointing(loss_fn)  # learned dim weights and where the dim schedule stands
checkpoint_root = os.path.join(cfg.output_dir, "checkpoints")
if args.resume:
    resume_dir = args.resume
    if resume_dir == "latest":
        found = [d for d in os.listdir(checkpoint_root) if d.startswith("step_")] if os.path.isdir(checkpoint_root) else []
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {checkpoint_root}")
        resume_dir = os.path.join(checkpoint_root, max(found, key=lambda d: int(d.split("_")[1])))
    accelerator.load_state(resume_dir)
    accelerator.print(f"resumed from {resume_dir} at step {progress.step} (epoch {progress.epoch})")


def evaluate(split: str, n_layers: int | None = None) -> dict[int, float]:
    """Per-dim Spearman on one eval table, on the main process (the other processes wait)."""
    scores = {}
    if accelerator.is_main_process:
        scores = evaluate_sts(accelerator.unwrap_model(model), eval_tables[split], eval_dims, cfg.eval.batch_size,
                              n_layers=n_layers)
    accelerator.wait_for_everyone()
    return scores


def log_scores(split: str, scores: dict[int, float], step: int, n_layers: int | None = None) -> None:
    """Per-dim eval scores as tracker scalars: eval/<split>/spearman[/layers<k>]/d<dim>."""
    tag = f"eval/{split}/spearman" + (f"/layers{n_layers}" if n_layers else "")
    accelerator.log({f"{tag}/d{d}": s for d, s in scores.items()}, step=step)


def save_checkpoint():
    accelerator.save_state(os.path.join(checkpoint_root, f"step_{progress.step}"))
    if accelerator.is_main_process:  # nanoGPT's habit: the resolved config travels with every checkpoint
        with open(os.path.join(checkpoint_root, f"step_{progress.step}", "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


results = {"dims": sorted(eval_dims, reverse=True), "dev": {}, "test": {}, "dev_during_training": {}}
if cfg.log.with_:
    flat = {k: str(v) if isinstance(v, (list, dict, type(None))) else v
            for section, fields in cfg.to_dict().items() if isinstance(fields, dict) for k, v in
            ((f"{section}.{k}", v) for k, v in fields.items())}
    accelerator.init_trackers("mrl", config=flat)
if not args.resume and cfg.eval.at_start and eval_tables:  # the starting point, for the before/after table
    for split in eval_tables:
        results[split]["before training"] = evaluate(split)
        log_scores(split, results[split]["before training"], step=0)
    accelerator.print(markdown_table({f"{split}, before training": results[split]["before training"]
                                      for split in eval_tables}))

# -- the loop
model.train()
running, counts = {}, {}  # per-key loss sums and counts since the last log, on the device (no sync per step)
step_dims, dims_trained = set(), {}  # the dims of this optimiser step; how many steps trained each dim
dims_log = os.path.join(cfg.output_dir, "dims_trained.jsonl")  # with n_dims_per_step: one line per step
if cfg.loss.n_dims_per_step is not None and accelerator.is_main_process:
    os.makedirs(cfg.output_dir, exist_ok=True)
    kept = []  # on resume: the steps up to the checkpoint (a crashed run may have logged steps past it)
    if args.resume and os.path.exists(dims_log):
        with open(dims_log) as f:
            kept = [line for line in f if json.loads(line)["step"] <= progress.step]
    with open(dims_log, "w") as f:
        f.writelines(kept)
dims_loss_fn = loss_fn.matryoshka if cfg.loss.two_d else loss_fn
bar = tqdm(total=total_steps, initial=progress.step, desc="train", disable=not accelerator.is_main_process)
samples, start_time, start_step = 0, time.perf_counter(), progress.step
# the steps that met a batch shape for the first time, timed apart: there a compiled forward compiles, and any
# run's first step sets up kernels and memory. The rate of the other steps compares compiled and eager runs
shapes_seen, new_shape_samples, new_shape_seconds = set(), 0, 0.0
while progress.step < total_steps and progress.epoch < cfg.train.epochs:
    sampler.set_epoch(progress.epoch)  # the same shuffles on every process, and again on resume
    loader.set_epoch(progress.epoch)
    epoch_loader = accelerator.skip_first_batches(loader, progress.batch_in_epoch) if progress.batch_in_epoch else loader
    for batch in epoch_loader:
        batch_start, shape = time.perf_counter(), tuple(batch["input_ids"].shape)
        with accelerator.accumulate(model):
            labels = batch.pop("labels", None)
            if cuda_graphs:  # the previous step's graph outputs are no longer needed: their memory may be reused
                torch.compiler.cudagraph_mark_step_begin()
            if cfg.train.cache_chunk_size:  # GradCache: chunked forwards, the same gradients
                loss, per_dim = cached_backward(partial(model, all_layers=cfg.loss.two_d), batch, len(columns),
                                                partial(compute_loss, labels=labels), cfg.train.cache_chunk_size,
                                                accelerator.backward, no_sync=partial(accelerator.no_sync, model))
            else:
                # every column's texts as one batch, embedded in length groups (less padding): k × (B, D), or
                # k × (B, L, D) with every layer's embedding (2D)
                embeddings = embed_by_length(partial(forward, all_layers=cfg.loss.two_d), batch,
                                             length_groups_for(len(batch["input_ids"])),
                                             cfg.train.pad_to_multiple_of).chunk(len(columns))
                loss, per_dim = compute_loss(list(embeddings), labels)
                accelerator.backward(loss)
            if accelerator.sync_gradients and loss_parameters and accelerator.num_processes > 1:
                for p in loss_parameters:  # not inside DDP: average their gradients across processes here
                    p.grad = accelerator.reduce(p.grad, "mean")
            if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        progress.batch_in_epoch += 1
        batch_samples = len(batch["input_ids"]) // len(columns) * accelerator.num_processes
        samples += batch_samples
        if shape not in shapes_seen:
            shapes_seen.add(shape)
            new_shape_samples += batch_samples
            new_shape_seconds += time.perf_counter() - batch_start
        for d, value in {"total": loss.detach(), **per_dim}.items():  # a dim or layer drawn on some steps only
            running[d], counts[d] = running.get(d, 0.0) + value, counts.get(d, 0) + 1  # averages its own steps
        step_dims.update(d for d in per_dim if isinstance(d, int))
        if not accelerator.sync_gradients:
            continue

        progress.step += 1
        bar.update(1)
        if cfg.loss.n_dims_per_step is not None and accelerator.is_main_process:  # which dims this step trained
            with open(dims_log, "a") as f:
                f.write(json.dumps({"step": progress.step, "dims": sorted(step_dims, reverse=True)}) + "\n")
        for d in step_dims:
            dims_trained[d] = dims_trained.get(d, 0) + 1
        step_dims = set()
        if progress.step % cfg.log.every == 0 or progress.step == total_steps:
            logs = {"train/loss" if d == "total" else f"train/loss/{f'd{d}' if isinstance(d, int) else d}":
                    (v / counts[d]).item() for d, v in running.items()}  # .item(): one host sync per log interval
            logs["train/lr"] = scheduler.get_last_lr()[0]
            if loss_parameters:  # learned dim weights
                logs.update({f"train/dim_weight/d{d}": w for d, w in dims_loss_fn.current_weights().items()})
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.2e}")
            accelerator.log(logs, step=progress.step)
            running, counts = {}, {}
        if cfg.eval.every and progress.step % cfg.eval.every == 0 and progress.step < total_steps and "dev" in eval_tables:
            scores = results["dev_during_training"][progress.step] = evaluate("dev")
            log_scores("dev", scores, progress.step)
            bar.write(markdown_table({f"dev, step {progress.step}": scores}))
        if cfg.train.save_every and progress.step % cfg.train.save_every == 0:
            save_checkpoint()
        if progress.step >= total_steps:
            break
    else:  # the epoch ran out (not a max_steps break)
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
bar.close()
train_seconds = time.perf_counter() - start_time

# -- final evaluation and outputs; only the main process writes
if cfg.train.save_every and progress.step % cfg.train.save_every:
    save_checkpoint()  # the last steps, for a later --resume with more steps or epochs
for split in eval_tables:
    results[split]["after training"] = evaluate(split)
    log_scores(split, results[split]["after training"], progress.step)
    for n_layers in cfg.eval.layers or []:  # the embeddings of the first n layers (2D Matryoshka)
        scores = results[split][f"after training, {n_layers} layers"] = evaluate(split, n_layers)
        log_scores(split, scores, progress.step, n_layers)
results["train"] = {"steps": progress.step - start_step, "processes": accelerator.num_processes,
                    "dims_trained": {d: dims_trained[d] for d in sorted(dims_trained, reverse=True)},
                    "cross_device": cross_device, "samples": samples, "seconds": round(train_seconds, 1),
                    "samples_per_second": round(samples / max(train_seconds, 1e-9), 1),
                    "new_shape_steps": {"count": len(shapes_seen), "seconds": round(new_shape_seconds, 1)},
                    "samples_per_second_other_steps": round((samples - new_shape_samples)
                                                            / max(train_seconds - new_shape_seconds, 1e-9), 1)
                                                      if samples > new_shape_samples else None,
                    "peak_cuda_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None}
if cfg.loss.matryoshka:
    results["train"]["dim_weights"] = dims_loss_fn.current_weights()  # learned: where they ended
if accelerator.is_main_process:
    trained = accelerator.unwrap_model(model)
    trained.save(os.path.join(cfg.output_dir, "model"), matryoshka_dims=cfg.loss.dims if cfg.loss.matryoshka else None)
    command = shlex.join(["accelerate", "launch", "train.py", "--config", args.config,
                          *[a for override in args.set for a in ("--set", override)]])
    with open(os.path.join(cfg.output_dir, "model", "README.md"), "w") as f:
        f.write(model_card(cfg.to_dict(), results, command, trained.embedding_dim))
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
        json.dump({"config": cfg.to_dict(), **results}, f, indent=2)
    table = markdown_table({f"{split}, {when}": scores for split in ("dev", "test")
                            for when, scores in results[split].items() if scores})
    with open(os.path.join(cfg.output_dir, "results.md"), "w") as f:
        f.write(f"STS-B Spearman ×100 per dim; {results['train']}\n\n{table}\n")
    accelerator.print(f"\n{table}\n\nwrote {cfg.output_dir}/model, results.json, results.md "
                      f"({results['train']['samples_per_second']} samples/s)")
accelerator.end_training()
