"""The run folder (`output_dir`): checkpoints to resume from, and the final outputs.

    output_dir/
      checkpoints/step_N/   accelerate's save_state (model, optimiser, scheduler, RNG states, Progress, ...)
                            plus config.yaml, the resolved config of the run that wrote it
      dims_trained.jsonl    with loss.dim_sampling: the dims each optimiser step trained, one line per step
      model/                the trained model in the sentence-transformers layout, with its card README.md
      config.yaml           the resolved config
      results.json          config, per-dim scores before / during / after training, training statistics
      results.md            the per-dim table
"""

import json
import os

import yaml

from .report import model_card, results_markdown


class Progress:
    """Where training stands; saved inside every checkpoint, so resuming never parses folder names."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def save_checkpoint(accelerator, output_dir: str, step: int, config: dict) -> None:
    """accelerator.save_state into checkpoints/step_<step>, with the resolved config beside it (nanoGPT's
    habit: the config travels with every checkpoint)."""
    path = os.path.join(output_dir, "checkpoints", f"step_{step}")
    accelerator.save_state(path)
    if accelerator.is_main_process:
        _write_yaml(os.path.join(path, "config.yaml"), config)


def find_checkpoint(resume: str, output_dir: str) -> str:
    """--resume's folder: the path as given, or for 'latest' the highest-numbered checkpoints/step_N."""
    if resume != "latest":
        return resume
    root = os.path.join(output_dir, "checkpoints")
    found = [d for d in os.listdir(root) if d.startswith("step_")] if os.path.isdir(root) else []
    if not found:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {root}")
    return os.path.join(root, max(found, key=lambda d: int(d.split("_")[1])))


class DimsLog:
    """dims_trained.jsonl: {"step": N, "dims": [...]} for every optimiser step. On resume it keeps the steps up
    to the checkpoint's (a crashed run may have logged steps past it) and goes on from there."""

    def __init__(self, output_dir: str, resume_step: int | None = None):
        self.path = os.path.join(output_dir, "dims_trained.jsonl")
        os.makedirs(output_dir, exist_ok=True)
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
                  matryoshka_dims: list[int] | None) -> None:
    """The trained model (sentence-transformers layout) with its model card, config.yaml, results.json and
    results.md."""
    model_dir = os.path.join(output_dir, "model")
    model.save(model_dir, matryoshka_dims=matryoshka_dims)
    with open(os.path.join(model_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(config, results, command, model.embedding_dim))
    _write_yaml(os.path.join(output_dir, "config.yaml"), config)
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": config, **results}, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(results))


def _write_yaml(path: str, config: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
