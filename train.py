"""Train a Matryoshka embedding model, top to bottom:
config -> accelerator -> model -> data -> loss -> optimiser -> prepare -> resume -> loop -> eval -> save.

    accelerate launch train.py                                   # configs/default.yaml
    accelerate launch train.py --config configs/nli-matryoshka.yaml --set train.lr=3e-5
    python train.py --set train.max_steps=20 --set output_dir=runs/smoke
    accelerate launch train.py --config ... --resume latest      # or --resume runs/x/checkpoints/step_100
"""

import argparse
import math
import shlex
import sys
import time
from dataclasses import replace
from functools import partial

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.utils import logging as hf_logging

from mrl.cli import one_line_errors
from mrl.run.config import check_against_model, config_warnings, dataset_field, dataset_loss, flat_dict, load_config, named_specs
from mrl.data import load_table, text_columns
from mrl.run.gradcache import cached_backward
from mrl.run.batches import training_batches
from mrl.run.monitor import StepMonitor
from mrl.loss.matryoshka import LossParts
from mrl.loss.objective import Objective
from mrl.eval.report import markdown_table, result_rows
from mrl.run.folder import DimsLog, Progress, check_resumable, find_checkpoint, prepare, save_checkpoint, write_outputs
from mrl.model.sharding import full_model, is_sharded
from mrl.model.load import load_encoder
from mrl.sources import load_mirror
from mrl.run.speed import compile_forward, describe, embed_by_length, length_groups_for
from mrl.eval.sts import evaluate_sts
from mrl.run.throughput import Throughput

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--config", default="configs/default.yaml", help="YAML file of changes to mrl/run/config.py")
parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-5")
parser.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest' (in output_dir/checkpoints)")
parser.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
args = parser.parse_args()
sys.excepthook = one_line_errors  # a config, data or run-folder error prints as one line (mrl/cli.py)
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
prepare(accelerator, cfg.output_dir, args.resume, args.overwrite)  # writable, and no other run in it unless asked
mirror = load_mirror(cfg.mirror)

# -- model: loaded first, so the config is checked against it (width, layers, length) before any data is read
model = load_encoder(cfg.model, mirror, cfg.train.gradient_checkpointing)  # with LoRA adapters if asked
check_against_model(cfg, model, accelerator.device)
accelerator.print(f"model: {model.name_or_path} ({model.embedding_dim} dims, max_seq_length {model.max_seq_length})")

# -- data: every table is loaded and checked before the first step; one dataset, or a mixture (mrl/data/mixture.py)
specs = named_specs(cfg.data.train)  # {name: dataset spec}; one plain spec is {"train": spec}
loss_names = [dataset_loss(spec, cfg.loss.name) for spec in specs.values()]  # each dataset's loss
with accelerator.main_process_first():  # the first process fills the datasets cache, the others read it
    tables = {name: load_table(spec, dataset_field(name, specs), loss == "cosent", mirror)
              for (name, spec), loss in zip(specs.items(), loss_names)}
    eval_tables = {split: load_table(spec, f"eval.{split}", True, mirror)
                   for split, spec in (("dev", cfg.eval.dev), ("test", cfg.eval.test)) if spec is not None}
for split, table in {**tables, **eval_tables}.items():
    accelerator.print(f"{split}: {len(table)} rows, text columns {text_columns(table)}"
                      + (", label in [0, 1]" if "label" in table.column_names else ""))
with accelerator.main_process_first():  # each checked; token ids once, up front (cached): no tokenizer in the steps
    train_table, sampler, collate, warnings = training_batches(cfg, specs, tables, model, accelerator.num_processes,
                                                               mirror, accelerator.device)
for warning in config_warnings(cfg) + warnings:
    accelerator.print(f"warning: {warning}")
# the loader's own generator: starting an epoch's iterator then draws no number from the global RNG, so dropout
# after a resume (global RNG restored from the checkpoint) matches the uninterrupted run
loader = DataLoader(train_table, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                    pin_memory=accelerator.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.train.seed))

# -- loss: Σ_d w_d · L(normalize(e[:, :d])) and the options of the loss section (mrl/loss/objective.py); one per
# loss a dataset names (a mixture may train CoSENT on scored pairs and MNRL on triplets)
objectives = {name: Objective(replace(cfg.loss, name=name), model.embedding_dim, accelerator.num_processes)
              for name in dict.fromkeys(loss_names)}
objective = objectives[loss_names[0]]  # the first dataset's: its dim weights and cross-device setting are reported
n_columns = [len(c.columns) for c in collate.collators]  # each dataset's text columns
length_groups = length_groups_for(cfg.train.batch_size * n_columns[0], cfg.speed.length_groups, accelerator.device)
accelerator.print(f"loss: {', '.join(map(str, objectives.values()))} ({accelerator.num_processes} process(es)), "
                  + describe(cfg.speed, cfg.train.cache_chunk_size, length_groups))

# -- optimiser and schedule (no weight decay on biases and LayerNorm weights, as in BERT)
trainable = [p for p in model.parameters() if p.requires_grad]
loss_parameters = [p for o in objectives.values() for p in o.loss.to(accelerator.device).parameters()]  # learned weights
optimizer = torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
                               {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
                               {"params": loss_parameters, "weight_decay": 0.0, "lr": cfg.loss.dim_weight_lr}],  # own rate
                              lr=cfg.train.lr, fused=accelerator.device.type in ("cuda", "cpu"))  # one kernel, not ~10 per tensor
steps_per_epoch = math.ceil(len(loader) / (accelerator.num_processes * cfg.train.grad_accum))
total_steps = min(cfg.train.epochs * steps_per_epoch, cfg.train.max_steps or math.inf)
# warm-up steps rounded up, as the reference trainer does; a prepared scheduler steps once per process per step
scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.train.warmup_ratio * total_steps) * accelerator.num_processes,
                                            total_steps * accelerator.num_processes)
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
forward = compile_forward(model, cfg.speed.compile, collate.collators[0].max_length, cfg.speed.pad_to_multiple_of, length_groups)
cuda_graphs = cfg.speed.compile == "reduce-overhead" and accelerator.device.type == "cuda"

# -- the step's forward and backward, chosen once: plain, or GradCache (the same gradients in chunks of memory)
all_layers = cfg.loss.two_d.enabled  # 2D: every layer's embedding, k × (B, L, D)
if cfg.train.cache_chunk_size:
    def forward_backward(batch: dict, targets: dict, objective, k: int) -> LossParts:
        return cached_backward(partial(model, all_layers=all_layers), batch, k, partial(objective, **targets),
                               cfg.train.cache_chunk_size, accelerator.backward, no_sync=partial(accelerator.no_sync, model))
else:
    def forward_backward(batch: dict, targets: dict, objective, k: int) -> LossParts:
        # every column's texts as one batch, embedded in length groups (less padding): k columns × (B, D)
        groups = length_groups_for(len(batch["input_ids"]), cfg.speed.length_groups, accelerator.device)
        embeddings = embed_by_length(partial(forward, all_layers=all_layers), batch, groups, cfg.speed.pad_to_multiple_of)
        parts = objective(list(embeddings.chunk(k)), **targets)
        accelerator.backward(parts.total)
        return parts

# -- resume: everything a step depends on is in the checkpoint (weights, optimiser, schedule, RNG, progress)
progress = Progress()  # and each objective's learned dim weights, if any, and where its dim schedule stands:
accelerator.register_for_checkpointing(progress, *[x for o in objectives.values() for x in (o.loss, o.dim_sampler) if x])
if args.resume:
    resume_dir = find_checkpoint(args.resume, cfg.output_dir)
    check_resumable(resume_dir, cfg.to_dict())  # the same model, data, loss and optimisation, or an error
    accelerator.load_state(resume_dir)
    if progress.step >= total_steps:
        raise ValueError(f"--resume: {resume_dir} is at step {progress.step} and this run ends at step {total_steps} "
                         f"(train.max_steps, train.epochs): nothing is left to train")
    accelerator.print(f"resumed from {resume_dir} at step {progress.step} (epoch {progress.epoch})")


eval_dims = cfg.eval.dims or cfg.loss.dims


def evaluate(split: str, step: int, n_layers: int | None = None) -> dict[int, float]:
    """Per-dim Spearman on one eval table, on the main process (the other processes wait), logged as tracker
    scalars eval/<split>/spearman[/layers<k>]/d<dim>."""
    scores = {}
    if accelerator.is_main_process or is_sharded(accelerator):  # a sharded model runs on every process
        scores = evaluate_sts(accelerator.unwrap_model(model), eval_tables[split], eval_dims, cfg.eval.batch_size,
                              n_layers=n_layers, prompt=cfg.eval.prompt)
    accelerator.wait_for_everyone()
    tag = f"eval/{split}/spearman" + (f"/layers{n_layers}" if n_layers else "")
    accelerator.log({f"{tag}/d{d}": s for d, s in scores.items()}, step=step)
    return scores


results = {"dims": sorted(eval_dims, reverse=True), "dev": {}, "test": {}, "dev_during_training": {}}
if cfg.log.with_:
    accelerator.init_trackers("mrl", config=flat_dict(cfg))
if not args.resume and cfg.eval.at_start and eval_tables:  # the starting point, for the before/after table
    for split in eval_tables:
        results[split]["before training"] = evaluate(split, step=0)
    accelerator.print(markdown_table(result_rows(results)))

# -- the loop
model.train()
monitor = StepMonitor()  # each step's losses and gradient norm, checked finite without a host sync per step
check_every = 1 if accelerator.device.type == "cpu" else cfg.log.every  # a check is a host sync on a GPU
dims_log = (DimsLog(cfg.output_dir, progress.step if args.resume else None)
            if any(o.dim_sampler for o in objectives.values()) and accelerator.is_main_process else None)
bar = tqdm(total=total_steps, initial=progress.step, desc="train", disable=not accelerator.is_main_process)
throughput, start_step = Throughput(), progress.step
while progress.step < total_steps and progress.epoch < cfg.train.epochs:
    sampler.set_epoch(progress.epoch)  # the same shuffles on every process, and again on resume
    loader.set_epoch(progress.epoch)
    epoch_loader = accelerator.skip_first_batches(loader, progress.batch_in_epoch) if progress.batch_in_epoch else loader
    for batch in epoch_loader:
        batch_start, shape = time.perf_counter(), tuple(batch["input_ids"].shape)
        with accelerator.accumulate(model):
            dataset, teacher = batch.pop("dataset"), batch.pop("teacher", None)  # which of the mixture; loss.teacher
            targets = {"labels": batch.pop("labels", None), "teacher": None if teacher is None else
                       list(teacher.chunk(n_columns[dataset]))}
            if cuda_graphs:  # the previous step's graph outputs are no longer needed: their memory may be reused
                torch.compiler.cudagraph_mark_step_begin()
            parts = forward_backward(batch, targets, objectives[loss_names[dataset]], n_columns[dataset])
            if accelerator.sync_gradients:
                for p in loss_parameters if accelerator.num_processes > 1 else []:  # not inside DDP: averaged here
                    p.grad = None if p.grad is None else accelerator.reduce(p.grad, "mean")  # (another loss's: None)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        progress.batch_in_epoch += 1
        throughput.add(shape, len(batch["input_ids"]) // n_columns[dataset] * accelerator.num_processes,
                       time.perf_counter() - batch_start)
        monitor.add(parts, list(specs)[dataset] if len(specs) > 1 else None)  # a mixture: per dataset too
        if not accelerator.sync_gradients:
            continue

        progress.step += 1
        bar.update(1)
        step_dims = monitor.end_step(progress.step, grad_norm)
        if dims_log:
            dims_log.write(progress.step, step_dims)
        log_now = progress.step % cfg.log.every == 0 or progress.step == total_steps
        eval_now = cfg.eval.every and progress.step % cfg.eval.every == 0 and progress.step < total_steps
        save_now = cfg.train.save_every and progress.step % cfg.train.save_every == 0
        if progress.step % check_every == 0 or log_now or eval_now or save_now:
            monitor.check()  # a non-finite loss or gradient norm stops the run here, before anything is saved
        if log_now:
            logs = {**monitor.averages(), "train/lr": scheduler.get_last_lr()[0]}
            if loss_parameters:  # learned dim weights
                logs.update({f"train/dim_weight/d{d}": w for d, w in objective.matryoshka.current_weights().items()})
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.2e}")
            accelerator.log(logs, step=progress.step)
        if eval_now and "dev" in eval_tables:
            scores = results["dev_during_training"][progress.step] = evaluate("dev", progress.step)
            bar.write(markdown_table({f"dev, step {progress.step}": scores}))
        if save_now:
            save_checkpoint(accelerator, cfg.output_dir, progress.step, cfg.to_dict(), model)
        if progress.step >= total_steps:
            break
    else:  # the epoch ran out (not a max_steps break)
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
bar.close()
monitor.check()
results["train"] = {"steps": progress.step - start_step, "processes": accelerator.num_processes,
                    "dims_trained": dict(sorted(monitor.dims_trained.items(), reverse=True)),
                    "cross_device": objective.cross_device, **throughput.summary()}

# -- final evaluation and outputs; only the main process writes
if cfg.train.save_every and progress.step % cfg.train.save_every:
    save_checkpoint(accelerator, cfg.output_dir, progress.step, cfg.to_dict(), model)  # for a later, longer --resume
for split in eval_tables:
    results[split]["after training"] = evaluate(split, progress.step)
    for n_layers in cfg.eval.layers or []:  # the embeddings of the first n layers (2D Matryoshka)
        results[split][f"after training, {n_layers} layers"] = evaluate(split, progress.step, n_layers)
if cfg.loss.matryoshka:
    results["train"]["dim_weights"] = objective.matryoshka.current_weights()  # learned: where they ended
trained = full_model(accelerator, model, rebuild=lambda: load_encoder(cfg.model, mirror))  # FSDP: gathered
if accelerator.is_main_process:
    command = shlex.join(["accelerate", "launch", "train.py", "--config", args.config,
                          *[a for override in args.set for a in ("--set", override)]])
    write_outputs(cfg.output_dir, trained, cfg.to_dict(), results, command, cfg.loss.dims if cfg.loss.matryoshka else None)
    accelerator.print(f"\n{markdown_table(result_rows(results))}\n\nwrote {cfg.output_dir}/model, results.json, "
                      f"results.md ({results['train']['samples_per_second']} samples/s)")
accelerator.end_training()
