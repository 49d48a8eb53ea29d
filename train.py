"""Train a Matryoshka embedding model, top to bottom:
config -> accelerator -> model -> data -> loss -> optimiser -> prepare -> resume -> loop -> eval -> save.

    accelerate launch train.py                                   # configs/default.yaml
    accelerate launch train.py --config configs/nli-matryoshka.yaml --set train.lr=3e-5
    python train.py --set train.max_steps=20 --set output_dir=runs/smoke
    accelerate launch train.py --config ... --resume latest      # or --resume runs/x/checkpoints/step_100
"""

import argparse
import math
import sys
import time
from functools import partial

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from mrl.cli import one_line_errors
from mrl.eval.report import markdown_table, result_rows
from mrl.eval.sts import evaluate_sts_stored
from mrl.loss.matryoshka import LossParts
from mrl.loss.objective import dataset_objectives
from mrl.loss.quantisation import QUANTISED
from mrl.model.load import load_encoder
from mrl.model.sharding import full_model, is_sharded
from mrl.run.batches import describe, eval_tables, training_batches, training_tables
from mrl.run.config import check_against_model, config_warnings, dataset_losses, flat_dict, load_config
from mrl.run.folder import DimsLog, Progress, launch_command, prepare, resume, save_checkpoint, write_outputs
from mrl.run.gradcache import cached_backward
from mrl.run.monitor import StepMonitor
from mrl.run.optimizer import linear_schedule, param_groups, reduce_grads
from mrl.run.quantisation import RECORD, calibrate, quantisation_record
from mrl.run.speed import compile_forward, describe as describe_speed, embed_by_length, length_groups_for
from mrl.run.throughput import Throughput
from mrl.sources import load_mirror

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--config", default="configs/default.yaml", help="YAML of changes to mrl/run/config.py")
parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.lr=3e-5")
parser.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest'")
parser.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
args = parser.parse_args()
sys.excepthook = one_line_errors  # a config, data or run-folder error prints as one line (mrl/cli.py)
cfg = load_config(args.config, args.set)  # every config error surfaces here, before anything is loaded

# cpu=True on a machine without a GPU: Accelerate then joins processes started by torchrun / `accelerate
# launch --multi_gpu` into one gloo group (left False, each CPU process would train alone)
# non_blocking: batches (pinned on a GPU, below) are copied to the device without waiting for it
accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                          gradient_accumulation_steps=cfg.train.grad_accum,
                          log_with=cfg.log.with_ or None, project_dir=cfg.output_dir,
                          cpu=not torch.accelerator.is_available(),
                          dataloader_config=DataLoaderConfiguration(non_blocking=True))
set_seed(cfg.train.seed)
hf_logging.disable_progress_bar()
accelerator.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
prepare(accelerator, cfg.output_dir, args.resume, args.overwrite)  # writable; no other run in it unless asked
mirror = load_mirror(cfg.mirror)
processes, device = accelerator.num_processes, accelerator.device

# -- model: loaded first, so the config is checked against it (width, layers, length) before any data is read
model = load_encoder(cfg.model, mirror, cfg.train.gradient_checkpointing)  # with LoRA adapters if asked
check_against_model(cfg, model, device)
accelerator.print(f"model: {model.name_or_path} ({model.embedding_dim} dims, "
                  f"max_seq_length {model.max_seq_length})")

# -- data: every table loaded and checked before the first step; one dataset, or a mixture (mrl/data/)
# the first process of each node fills its datasets cache (data.num_proc processes), the others then read it
with accelerator.local_main_process_first():
    tables, evals = training_tables(cfg, mirror), eval_tables(cfg, mirror)
for split, table in {**tables, **evals}.items():
    accelerator.print(f"{split}: {describe(table)}")
with accelerator.local_main_process_first():  # token ids once, up front (cached): no tokenizer in the steps
    train_table, sampler, collate, warnings = training_batches(cfg, tables, model, processes, mirror, device)
for warning in config_warnings(cfg) + warnings:
    accelerator.print(f"warning: {warning}")
# the loader's own generator: starting an epoch's iterator then draws no number from the global RNG, so
# dropout after a resume (global RNG restored from the checkpoint) matches the uninterrupted run
loader = DataLoader(train_table, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                    pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.train.seed))

# -- loss: Σ_d w_d · L(normalize(e[:, :d])) and the options of the loss section (mrl/loss/objective.py), for
# each dataset its loss's objective
objectives = dataset_objectives(cfg.loss, dataset_losses(cfg), model.embedding_dim, processes)
objective = objectives[0]  # the first dataset's: its dim weights and cross-device setting are reported
texts_per_batch = cfg.train.batch_size * collate.n_columns[0]
length_groups = length_groups_for(texts_per_batch, cfg.speed.length_groups, device)
accelerator.print(f"loss: {', '.join(map(str, dict.fromkeys(objectives)))} ({processes} process(es)), "
                  + describe_speed(cfg.speed, cfg.train.cache_chunk_size, length_groups))

# -- optimiser and schedule (no weight decay on biases and LayerNorm weights, as in BERT)
loss_parameters = [p for o in dict.fromkeys(objectives) for p in o.loss.to(device).parameters()]  # learned
groups = param_groups(model, loss_parameters, cfg.train.weight_decay, cfg.loss.dim_weight_lr)
optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, fused=device.type in ("cuda", "cpu"))  # one kernel
scheduler, total_steps = linear_schedule(optimizer, cfg.train, len(loader), processes)
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
max_length, pad_to = collate.collators[0].max_length, cfg.speed.pad_to_multiple_of
forward = compile_forward(model, cfg.speed.compile, max_length, pad_to, length_groups)
cuda_graphs = cfg.speed.compile == "reduce-overhead" and device.type == "cuda"

# -- the step's forward and backward, chosen once: plain, or GradCache (the same gradients, chunks of memory)
all_layers = cfg.loss.two_d.enabled  # 2D: every layer's embedding, k × (B, L, D)
if cfg.train.cache_chunk_size:
    def forward_backward(batch: dict, targets: dict, objective, k: int) -> LossParts:
        no_sync = partial(accelerator.no_sync, model)
        return cached_backward(partial(model, all_layers=all_layers), batch, k, partial(objective, **targets),
                               cfg.train.cache_chunk_size, accelerator.backward, no_sync=no_sync)
else:
    def forward_backward(batch: dict, targets: dict, objective, k: int) -> LossParts:
        # every column's texts as one batch, embedded in length groups (less padding): k columns × (B, D)
        groups = length_groups_for(len(batch["input_ids"]), cfg.speed.length_groups, device)
        embeddings = embed_by_length(partial(forward, all_layers=all_layers), batch, groups, pad_to)
        parts = objective(list(embeddings.chunk(k)), **targets)  # the total, each dim's loss, each option's
        accelerator.backward(parts.total)
        return parts

# -- quantisation-aware training: int8 / int4 ranges from the initial model (on resume: from the checkpoint)
if not args.resume:
    calibrate(objectives, accelerator.unwrap_model(model), cfg, tables)

# -- resume: everything a step depends on is in the checkpoint (weights, optimiser, schedule, RNG, progress)
progress = Progress()  # and each objective's learned dim weights, if any, and where its dim schedule stands:
accelerator.register_for_checkpointing(progress,
                                       *dict.fromkeys(x for o in objectives for x in o.checkpointed()))
if args.resume:
    resumed = resume(accelerator, args.resume, cfg.output_dir, cfg.to_dict(), progress, total_steps)
    accelerator.print(f"resumed from {resumed} at step {progress.step} (epoch {progress.epoch})")


eval_dims = cfg.eval.dims or cfg.loss.dims
stored_as = QUANTISED if objective.quantised else ()  # quantisation-aware: the final STS at each precision too


def evaluate(split: str, step: int, n_layers: int | None = None, precisions=()) -> dict[str, dict[int, float]]:
    """Per-dim Spearman on one eval table, float32 and stored at each of `precisions` (mrl.eval.sts), on the main
    process (the other processes wait, with empty scores), logged as tracker scalars
    eval/<split>/spearman[/layers<k>][/<precision>]/d<dim>."""
    scores = {precision: {} for precision in ("float32", *precisions)}
    if accelerator.is_main_process or is_sharded(accelerator):  # a sharded model runs on every process
        scores = evaluate_sts_stored(accelerator.unwrap_model(model), evals[split], eval_dims, list(scores),
                                     cfg.eval.batch_size, n_layers=n_layers, prompt=cfg.eval.prompt)
    accelerator.wait_for_everyone()
    for precision, by_dim in scores.items():
        tag = f"eval/{split}/spearman" + (f"/layers{n_layers}" if n_layers else "") + (
            f"/{precision}" if precision != "float32" else "")
        accelerator.log({f"{tag}/d{d}": s for d, s in by_dim.items()}, step=step)
    return scores


results = {"dims": sorted(eval_dims, reverse=True), "dev": {}, "test": {}, "dev_during_training": {}}
if cfg.log.with_:
    accelerator.init_trackers("mrl", config=flat_dict(cfg))
if not args.resume and cfg.eval.at_start and evals:  # the starting point, for the before/after table
    for split in evals:
        results[split]["before training"] = evaluate(split, step=0)["float32"]
    accelerator.print(markdown_table(result_rows(results)))

# -- the loop
model.train()
monitor = StepMonitor()  # each step's losses and gradient norm, checked finite without a host sync per step
check_every = 1 if device.type == "cpu" else cfg.log.every  # a check is a host sync on a GPU
sampled_dims = any(o.dim_sampler for o in objectives) and accelerator.is_main_process
dims_log = DimsLog(cfg.output_dir, progress.step if args.resume else None) if sampled_dims else None
bar = tqdm(total=total_steps, initial=progress.step, desc="train", disable=not accelerator.is_main_process)
throughput, start_step = Throughput(), progress.step
while progress.step < total_steps and progress.epoch < cfg.train.epochs:
    sampler.set_epoch(progress.epoch)  # the same shuffles on every process, and again on resume
    loader.set_epoch(progress.epoch)
    skip = progress.batch_in_epoch  # a resumed epoch: the batches it had done
    for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
        batch_start, shape = time.perf_counter(), tuple(batch["input_ids"].shape)
        with accelerator.accumulate(model):
            dataset, targets = collate.pop_targets(batch)  # which of the mixture; labels, teacher embeddings
            k = collate.n_columns[dataset]
            if cuda_graphs:  # the previous step's graph outputs are no longer needed: their memory is reused
                torch.compiler.cudagraph_mark_step_begin()
            parts = forward_backward(batch, targets, objectives[dataset], k)
            if accelerator.sync_gradients:
                reduce_grads(loss_parameters, accelerator)  # the learned dim weights: not inside DDP
                max_norm = cfg.train.max_grad_norm or math.inf
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        progress.batch_in_epoch += 1
        throughput.add(shape, len(batch["input_ids"]) // k * processes, time.perf_counter() - batch_start)
        monitor.add(parts, collate.source(dataset))  # a mixture: per dataset too
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
                weights = objective.matryoshka.current_weights()
                logs.update({f"train/dim_weight/d{d}": w for d, w in weights.items()})
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.2e}")
            accelerator.log(logs, step=progress.step)
        if eval_now and "dev" in evals:
            scores = results["dev_during_training"][progress.step] = evaluate("dev", progress.step)["float32"]
            bar.write(markdown_table({f"dev, step {progress.step}": scores}))
        if save_now:
            save_checkpoint(accelerator, cfg.output_dir, progress.step, cfg.to_dict(), model)
        if progress.step >= total_steps:
            break
    else:  # the epoch ran out (not a max_steps break)
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
bar.close()
monitor.check()
results["train"] = {"steps": progress.step - start_step, "processes": processes,
                    "dims_trained": dict(sorted(monitor.dims_trained.items(), reverse=True)),
                    "cross_device": objective.cross_device, **throughput.summary()}

# -- final evaluation and outputs; only the main process writes
if cfg.train.save_every and progress.step % cfg.train.save_every:
    save_checkpoint(accelerator, cfg.output_dir, progress.step, cfg.to_dict(), model)  # for a longer --resume
for split in evals:  # "after training", and "after training, int8" etc. at each stored precision
    for precision, scores in evaluate(split, progress.step, precisions=stored_as).items():
        results[split]["after training" + (f", {precision}" if precision != "float32" else "")] = scores
    for n_layers in cfg.eval.layers or []:  # the embeddings of the first n layers (2D Matryoshka)
        results[split][f"after training, {n_layers} layers"] = evaluate(split, progress.step, n_layers)["float32"]
if cfg.loss.matryoshka:
    results["train"]["dim_weights"] = objective.matryoshka.current_weights()  # learned: where they ended
trained = full_model(accelerator, model, rebuild=lambda: load_encoder(cfg.model, mirror))  # FSDP: gathered
if accelerator.is_main_process:
    trained_dims = cfg.loss.dims if cfg.loss.matryoshka else None  # recorded in the saved model's config
    record = {RECORD: quantisation_record(cfg, objective.quantised)} if objective.quantised else None
    write_outputs(cfg.output_dir, trained, cfg.to_dict(), results, launch_command(args.config, args.set),
                  trained_dims, model_files=record)  # with the precisions the model was trained for
    speed = results["train"]["samples_per_second"]
    accelerator.print(f"\n{markdown_table(result_rows(results))}\n\n"
                      f"wrote {cfg.output_dir}/model, results.json, results.md ({speed} samples/s)")
accelerator.end_training()
