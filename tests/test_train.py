"""train.py end to end on the tiny random model: a few steps run and write every output; bad configs fail early."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SHARED
from mrl.loss.matryoshka import LossParts
from mrl.run.monitor import StepMonitor

ROOT = Path(__file__).resolve().parents[1]
STSB = SHARED / "data" / "stsb"


def train_py(*settings, config="configs/default.yaml", launcher=(sys.executable,), resume=None, env=None,
             timeout=600, overwrite=False):
    """Run train.py with `--set` settings (through `launcher`), as a user would; the finished process."""
    args = [*launcher, "train.py", "--config", config, *[a for o in settings for a in ("--set", o)],
            *(["--resume", str(resume)] if resume else []), *(["--overwrite"] if overwrite else [])]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run_train(tmp_path, model_dir, *overrides, launcher=(sys.executable,), resume=None, overwrite=False,
              config="configs/default.yaml"):
    """The default recipe on the tiny model: 3 steps of batch 8 on 64 STS-B pairs, evaluated on 40 dev pairs."""
    spec = f"{{path: csv, data_files: {{train: {STSB}/train.csv}}, split: 'train[:64]', score_max: 5}}"
    dev = f"{{path: csv, data_files: {{train: {STSB}/dev.csv}}, split: 'train[:40]', score_max: 5}}"
    return train_py(f"model.name={model_dir}", f"data.train={spec}", f"eval.dev={dev}", "eval.test=null",
                    "loss.dims=[32,16,8]", "train.max_steps=3", "train.batch_size=8", f"output_dir={tmp_path}/run",
                    *overrides, launcher=launcher, resume=resume, overwrite=overwrite, config=config)


def test_short_run_writes_model_and_per_dim_results(tmp_path, tiny_model_dir):
    proc = run_train(tmp_path, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["steps"] == 3
    assert set(map(int, results["dev"]["after training"])) == {32, 16, 8}
    assert (tmp_path / "run" / "model" / "modules.json").exists()
    assert "d=8" in (tmp_path / "run" / "results.md").read_text()


def test_dim_larger_than_model_fails_before_training(tmp_path, tiny_model_dir):
    proc = run_train(tmp_path, tiny_model_dir, "loss.dims=[64,8]")
    assert proc.returncode != 0
    assert "loss.dims" in proc.stderr and "64" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


# `accelerate launch --multi_gpu --num_processes 2` on the CPU: torchrun underneath, and train.py joins the processes
# in a gloo group. (`accelerate launch --cpu --num_processes N` would start one process: Accelerate's CPU launcher
# is single-process without MPI.)
TWO_PROCESSES = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")


def launch_train(tmp_path, model_dir, *overrides):
    """run_train, in 2 processes."""
    return run_train(tmp_path, model_dir, *overrides, launcher=TWO_PROCESSES)


def run_nli_recipe(tmp_path, config, model_dir, *overrides, launcher=(sys.executable,)):
    """An NLI config as written (hub ids: the triplets and STS-B come from ../shared through configs/mirror.yaml),
    on the tiny model for 2 steps, evaluated on 50 STS-B dev pairs."""
    if not (SHARED / "data" / "nli").is_dir():
        pytest.skip("no NLI triplets in ../shared")
    return train_py(f"model.name={model_dir}", "loss.dims=[32,16,8]", "train.mixed_precision=no", "train.max_steps=2",
                    "eval.dev={path: sentence-transformers/stsb, split: 'validation[:50]'}", "eval.test=null",
                    f"output_dir={tmp_path}/run", *overrides, config=config, launcher=launcher)


def test_two_process_run_writes_one_set_of_outputs(tmp_path, tiny_model_dir):
    proc = launch_train(tmp_path, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["processes"] == 2
    assert results["train"]["steps"] == 3
    assert results["train"]["samples"] == 3 * 8 * 2  # each process takes its own batch of 8 per step
    assert proc.stdout.count("wrote ") == 1  # only the main process prints and writes
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "model", "results.json",
                                                                    "results.md"]


def encode_saved(path, texts=("a man is playing a guitar", "the cat sleeps", "two dogs run on the beach")):
    from mrl import Encoder

    return Encoder.from_pretrained(str(path)).encode(list(texts))


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, tiny_model_dir):
    whole = run_train(tmp_path / "whole", tiny_model_dir, "train.max_steps=4", "train.save_every=2")
    assert whole.returncode == 0, whole.stderr[-3000:]
    checkpoint = tmp_path / "whole" / "run" / "checkpoints" / "step_2"
    assert (checkpoint / "config.yaml").exists()

    resumed = run_train(tmp_path / "resumed", tiny_model_dir, "train.max_steps=4", resume=checkpoint)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    results = json.loads((tmp_path / "resumed" / "run" / "results.json").read_text())
    assert results["train"]["steps"] == 2  # only the steps after the checkpoint ran
    torch.testing.assert_close(encode_saved(tmp_path / "resumed" / "run" / "model"),
                               encode_saved(tmp_path / "whole" / "run" / "model"), rtol=0, atol=1e-6)


def test_resume_really_changes_the_starting_point(tmp_path, tiny_model_dir):
    """Guards the test above: a run of the last 2 steps from the initial weights ends elsewhere."""
    whole = run_train(tmp_path / "whole", tiny_model_dir, "train.max_steps=4")
    fresh = run_train(tmp_path / "fresh", tiny_model_dir, "train.max_steps=2")
    assert whole.returncode == 0 and fresh.returncode == 0
    difference = (encode_saved(tmp_path / "whole" / "run" / "model")
                  - encode_saved(tmp_path / "fresh" / "run" / "model")).abs().max()
    assert difference > 1e-4


def test_nli_recipe_runs_offline_through_the_mirror(tmp_path, tiny_model_dir):
    proc = run_nli_recipe(tmp_path, "configs/nli-matryoshka.yaml", tiny_model_dir, "train.batch_size=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "text columns ['anchor', 'positive', 'negative']" in proc.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["steps"] == 2 and results["config"]["loss"]["name"] == "contrastive"


def test_two_process_contrastive_run_with_cross_device_negatives_and_gradcache(tmp_path, tiny_model_dir):
    proc = run_nli_recipe(tmp_path, "configs/nli-matryoshka.yaml", tiny_model_dir, "train.batch_size=16",
                          "train.cache_chunk_size=8", "loss.dim_sampling.dims_per_step=2", launcher=TWO_PROCESSES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "negatives from every process (2 process(es)), GradCache chunks of 8 texts" in proc.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["processes"] == 2 and results["train"]["samples"] == 2 * 16 * 2


def test_two_process_2d_matryoshka_run(tmp_path, tiny_model_dir):
    """The 2D recipe under DDP (the reference breaks there), with GradCache and per-layer evaluation."""
    proc = run_nli_recipe(tmp_path, "configs/nli-2d-matryoshka.yaml", tiny_model_dir, "train.batch_size=8",
                          "train.cache_chunk_size=8", "eval.layers=[1]", "log.every=1", "log.with=tensorboard",
                          launcher=TWO_PROCESSES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["processes"] == 2
    assert set(results["dev"]["after training, 1 layers"]) == {"32", "16", "8"}
    scalars = read_scalars(tmp_path / "run")
    assert "train/loss/layer1" in scalars and "train/loss/kl_layer1" in scalars  # the tiny model has 2 layers
    assert "eval/dev/spearman/layers1/d16" in scalars


@pytest.mark.integration
def test_matryoshka_training_raises_dim_16_dev_spearman(tmp_path, minilm_dir):
    """The real model on real data: a few dozen steps of the default recipe (CoSENT in Matryoshka 384..8 on
    STS-B train) lift STS-B dev Spearman at dim 16 above the untrained model's, both measured in the run."""
    dev = f"{{path: csv, data_files: {{train: {STSB}/dev.csv}}, split: train, score_max: 5}}"
    proc = train_py(f"model.name={minilm_dir}", "train.max_steps=40", f"eval.dev={dev}", "eval.test=null",
                    f"output_dir={tmp_path}/run", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dev_scores = json.loads((tmp_path / "run" / "results.json").read_text())["dev"]
    assert dev_scores["after training"]["16"] > dev_scores["before training"]["16"]


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under log_dir: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for path in Path(log_dir).rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return scalars


def test_tensorboard_logs_per_dim_losses_lr_and_eval(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    proc = run_train(tmp_path, tiny_model_dir, "log.with=tensorboard", "log.every=1", "eval.every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(tmp_path / "run")
    for tag in ["train/loss", "train/lr", *(f"train/loss/d{d}" for d in (32, 16, 8))]:
        assert [step for step, _ in scalars[tag]] == [1, 2, 3], tag
    for d in (32, 16, 8):  # before training (step 0), during (eval.every=2) and after (step 3)
        assert [step for step, _ in scalars[f"eval/dev/spearman/d{d}"]] == [0, 2, 3]
    # the total is the sum of the per-dim losses (weights 1), step by step
    for i in range(3):
        per_dim = sum(scalars[f"train/loss/d{d}"][i][1] for d in (32, 16, 8))
        assert scalars["train/loss"][i][1] == pytest.approx(per_dim, rel=1e-5)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    final = dict(scalars["eval/dev/spearman/d16"])[3]
    assert final == pytest.approx(results["dev"]["after training"]["16"], abs=1e-4)


def test_the_monitor_logs_each_part_under_its_tag_and_counts_the_trained_dims():
    """train/loss, train/loss/d<dim>, train/loss/<term>, and for a mixture's dataset train/loss/<source>/...; a dim
    or term averages the micro-batches that had it; a step trained the dims of its micro-batches' per_dim."""
    monitor = StepMonitor()
    monitor.add(LossParts(torch.tensor(3.0), {32: torch.tensor(1.0), 8: torch.tensor(2.0)},
                          {"distill_d8": torch.tensor(0.5)}), source="nli")
    monitor.add(LossParts(torch.tensor(5.0), {32: torch.tensor(3.0), 16: torch.tensor(4.0)}))
    assert monitor.end_step(1, None) == [32, 16, 8]
    assert monitor.averages() == {"train/loss": 4.0, "train/loss/d32": 2.0, "train/loss/d16": 4.0,
                                  "train/loss/d8": 2.0, "train/loss/distill_d8": 0.5, "train/loss/nli/loss": 3.0,
                                  "train/loss/nli/d32": 1.0, "train/loss/nli/d8": 2.0,
                                  "train/loss/nli/distill_d8": 0.5}
    assert monitor.dims_trained == {32: 1, 16: 1, 8: 1}


def test_model_card_is_written_from_the_run(tmp_path, tiny_model_dir):
    proc = run_train(tmp_path, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert f"Base model: `{tiny_model_dir}`" in card
    assert "`cosent` loss" in card and "dims 32, 16, 8" in card
    assert "3 optimiser steps" in card
    after = results["dev"]["after training"]
    assert "| dev, after training | " + " | ".join(f"{after[str(d)]:.2f}" for d in (32, 16, 8)) + " |" in card
    assert "accelerate launch train.py --config configs/default.yaml --set model.name=" in card
    assert "train.max_steps=3" in card
    assert "SentenceTransformer(" in card and "Encoder.from_pretrained(" in card
    assert "{" not in card.split("## Results")[0].replace("{'train'", "")  # no unfilled template slots


def test_unreachable_model_names_the_id_the_mirror_and_the_fix(tmp_path):
    mirror = tmp_path / "mirror.yaml"
    mirror.write_text("models:\n  nobody/no-such-model: /nowhere/model\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MRL_MIRROR": str(mirror)}
    proc = train_py("model.name=nobody/no-such-model", f"output_dir={tmp_path}/run", env=env, timeout=300)
    assert proc.returncode != 0
    error = proc.stderr.strip().splitlines()[-1]
    assert "'nobody/no-such-model'" in error and str(mirror) in error and "/nowhere/model" in error
    assert "MRL_MIRROR" in error and "local path" in error


def test_unreachable_dataset_names_the_id_and_the_fix(tmp_path, tiny_model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = train_py(f"model.name={tiny_model_dir}", "loss.dims=[32,16]",
                    "data.train={path: nobody/no-such-data, split: train}", f"output_dir={tmp_path}/run", env=env,
                    timeout=300)
    assert proc.returncode != 0
    error = proc.stderr.strip().splitlines()[-1]
    assert "'nobody/no-such-data'" in error and "has no entry for it" in error and "MRL_MIRROR" in error
