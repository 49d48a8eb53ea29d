"""The run folder (`output_dir`): checkpoints to resume from, and the final outputs, never half-written.

    output_dir/
      checkpoints/step_N/   accelerate's save_state (model, optimiser, scheduler, RNG states, Progress, ...)
                            plus config.yaml, the resolved config of the run that wrote it. Written as
                            step_N.incomplete/ and renamed when every process has written its part, so a
                            step_N/ folder is always complete; `--resume latest` takes the newest
      dims_trained.jsonl    with loss.dim_sampling: the dims each optimiser step trained, one line per step
      model/                the trained model in the sentence-transformers layout, with its card README.md
      config.yaml           the resolved config
      results.md            the per-dim table
      results.json          config, per-dim scores before / during / after training, training statistics;
                            written last: a folder with results.json holds a finished run, all of it

The folder is checked writable before anything is loaded, and a folder that already holds a run is not
reused unless asked (--overwrite replaces it, --resume continues it).
"""

import json
import math
import os
import shlex
import shutil

import torch
import yaml

from mrl.run.monitor import NonFiniteLoss
from mrl.eval.report import model_card, results_markdown

INCOMPLETE = ".incomplete"  # the suffix of a checkpoint folder still being written
# what a checkpoint must share with the run that resumes it (the rest: length of training, logging, evaluation,
# speed options, paths); train.max_steps and train.epochs may grow, to train on from a finished run
TRAINING_FIELDS = ("model", "data.train", "data.no_duplicates", "data.prompts", "data.mixture", "loss",
                   "train.batch_size", "train.lr", "train.warmup_ratio", "train.weight_decay",
                   "train.max_grad_norm", "train.grad_accum", "train.mixed_precision", "train.seed", "train.drop_last",
                   "train.cache_chunk_size")


class Progress:
    """Where training stands; saved inside every checkpoint, so resuming never parses folder names."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def prepare(accelerator, output_dir: str, resume: str | None, overwrite: bool) -> None:
    """Before any model or data is loaded: the folder is writable, and holds no other run unless asked.

    A folder with a finished run (results.json) or checkpoints is refused without --resume (which continues
    it) or --overwrite (which deletes its checkpoints and outputs first: on the main process only)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise PermissionError(f"output_dir: cannot write to {output_dir!r} ({error.strerror}); the trained model "
                              f"would be lost at the end: choose a writable output_dir") from None
    held = [name for name in ("results.json", "checkpoints") if os.path.exists(os.path.join(output_dir, name))]
    if not held or resume:
        return
    if not overwrite:
        raise FileExistsError(f"output_dir: {output_dir!r} already holds a run ({' and '.join(held)}); pass "
                              f"--overwrite to replace it, --resume latest to continue it, or choose another output_dir")
    if accelerator.is_main_process:
        for name in ("results.json", "checkpoints", "model", "results.md", "config.yaml", "dims_trained.jsonl"):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, output_dir: str, step: int, config: dict, model) -> None:
    """accelerator.save_state into checkpoints/step_<step>, with the resolved config beside it (nanoGPT's
    habit: the config travels with every checkpoint); complete or not there at all, and never of a model
    with a non-finite parameter."""
    check_finite_parameters(model, f"step {step}", accelerator)
    path = os.path.join(output_dir, "checkpoints", f"step_{step}")
    if accelerator.is_main_process:  # what a killed run left of this step's write goes first
        shutil.rmtree(path + INCOMPLETE, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(path + INCOMPLETE)
    if accelerator.is_main_process:
        _write_yaml(os.path.join(path + INCOMPLETE, "config.yaml"), config)
    accelerator.wait_for_everyone()  # every process has written its part (its RNG state)
    if accelerator.is_main_process:
        if os.path.exists(path):  # the same step saved before (a resumed run's first save): replaced whole
            shutil.rmtree(path)
        os.replace(path + INCOMPLETE, path)
    accelerator.wait_for_everyone()


def find_checkpoint(resume: str, output_dir: str) -> str:
    """--resume's folder: the path as given, or for 'latest' the newest complete checkpoints/step_N."""
    if resume != "latest":
        if resume.rstrip("/").endswith(INCOMPLETE) or not os.path.isfile(os.path.join(resume, "config.yaml")):
            raise FileNotFoundError(f"--resume: {resume!r} is not a complete checkpoint (a complete one is a "
                                    f"checkpoints/step_N folder with its config.yaml)")
        return resume
    root = os.path.join(output_dir, "checkpoints")
    found = [d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(INCOMPLETE)] \
        if os.path.isdir(root) else []
    if not found:
        raise FileNotFoundError(f"--resume latest: no complete checkpoint in {root}")
    return os.path.join(root, max(found, key=lambda d: int(d.split("_")[1])))


def check_resumable(checkpoint: str, config: dict) -> None:
    """Refuse a checkpoint whose run trained otherwise than this config would (TRAINING_FIELDS), naming each
    field that differs, with both values."""
    with open(os.path.join(checkpoint, "config.yaml"), encoding="utf-8") as f:
        saved = yaml.safe_load(f)
    differ = [f"{name}: {old!r} there, {new!r} here" for name in TRAINING_FIELDS
              for old, new in [(_get(saved, name), _get(config, name))] if old != new]
    if differ:
        raise ValueError(f"--resume: {checkpoint} was trained with other settings; " + "; ".join(differ)
                         + ". Resume with the same settings, or start a new run in another output_dir")


def resume(accelerator, resume_from: str, output_dir: str, config: dict, progress: Progress, total_steps: int) -> str:
    """Load --resume's checkpoint (a folder, or 'latest') into everything registered with the accelerator
    (weights, optimiser, schedule, RNG, `progress`, ...), after checking it trained as `config` would and that
    steps are left to train; returns its folder."""
    checkpoint = find_checkpoint(resume_from, output_dir)
    check_resumable(checkpoint, config)  # the same model, data, loss and optimisation, or an error
    accelerator.load_state(checkpoint)
    if progress.step >= total_steps:
        raise ValueError(f"--resume: {checkpoint} is at step {progress.step} and this run ends at step {total_steps} "
                         f"(train.max_steps, train.epochs): nothing is left to train")
    return checkpoint


def launch_command(config_path: str, overrides: list[str]) -> str:
    """The command that repeats this run, for the model card and results."""
    return shlex.join(["accelerate", "launch", "train.py", "--config", config_path,
                       *[a for override in overrides for a in ("--set", override)]])


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


class DimsLog:
    """dims_trained.jsonl: {"step": N, "dims": [...]} for every optimiser step. On resume it keeps the steps up
    to the checkpoint's (a crashed run may have logged steps past it) and goes on from there."""

    def __init__(self, output_dir: str, resume_step: int | None = None):
        self.path = os.path.join(output_dir, "dims_trained.jsonl")
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, step: int, dims) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "dims": sorted(dims, reverse=True)}) + "\n")


def write_outputs(output_dir: str, model, config: dict, results: dict, command: str,
                  matryoshka_dims: list[int] | None, model_files: dict[str, dict] | None = None) -> None:
    """The trained model (sentence-transformers layout) with its model card, config.yaml, results.md and
    results.json, all together: written into a temporary folder; then a previous run's outputs are removed
    (its results.json first) and the new ones moved into place (results.json last). A kill leaves old outputs
    whole, or new ones without results.json (an unfinished run): never new weights beside old results.
    model_files: {name: content}, JSON files written into the model folder beside the model."""
    check_finite_parameters(model, "the end of training")
    staging = os.path.join(output_dir, "outputs" + INCOMPLETE)
    shutil.rmtree(staging, ignore_errors=True)
    model.save(os.path.join(staging, "model"), matryoshka_dims=matryoshka_dims)
    for name, content in (model_files or {}).items():  # e.g. quantisation.json (mrl.run.quantisation)
        with open(os.path.join(staging, "model", name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    with open(os.path.join(staging, "model", "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(config, results, command, model.embedding_dim))
    _write_yaml(os.path.join(staging, "config.yaml"), config)
    with open(os.path.join(staging, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(results))
    with open(os.path.join(staging, "results.json"), "w", encoding="utf-8") as f:
        json.dump(finite_or_null({"config": config, **results}), f, indent=2, allow_nan=False)
    names = ("model", "config.yaml", "results.md", "results.json")
    for name in ("results.json", *names[:-1]):  # a previous run's outputs go first, its results.json before all
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
    for name in names:  # results.json last: where it is, everything beside it is of the same run
        os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    os.rmdir(staging)


def check_finite_parameters(model, when: str, accelerator=None) -> None:
    """Raise NonFiniteLoss, saving nothing, if a parameter of `model` is NaN or infinite. With `accelerator`,
    every process checks its own part (a shard, under FSDP) and all of them raise if any part is bad."""
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731  a shard of a sharded weight
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(local(p)).all()]
    if accelerator is not None and accelerator.num_processes > 1:
        if accelerator.reduce(torch.tensor(len(bad), device=accelerator.device), "sum").item() and not bad:
            bad = ["(on another process)"]
    if bad:
        raise NonFiniteLoss(f"training diverged: at {when}, {len(bad)} parameter tensors hold NaN or inf values "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); nothing was saved. Lower "
                            f"train.lr, or look for bad rows in the training data")


def finite_or_null(value):
    """`value` with every NaN or infinite float replaced by None (JSON null): results.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def _write_yaml(path: str, config: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
