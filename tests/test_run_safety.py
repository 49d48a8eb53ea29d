"""A run never ends in a silently broken model and never loses a trained one: checks before compute, a stop on
divergence, a safe run folder. One section per failure it guards against; each test would pass on none of
them without its guard."""

import dataclasses
import gzip
import json
import os
import random
import shutil
import signal
import sys
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mrl import Encoder
from mrl.run.config import (at_least, check_against_model, check_fields, config_warnings, load_config, one_of,
                            option, within)
from mrl.data import LABEL, BatchSampler, degenerate_data, load_table
from mrl.loss.base import contrastive_loss
from mrl.loss.matryoshka import LossParts, per_dim_losses
from mrl.run.monitor import NonFiniteLoss, StepMonitor
from mrl.loss.nested import contrastive_losses_nested, cosent_losses_nested
from mrl.run.folder import finite_or_null, write_outputs
from test_train import encode_saved, run_train

from conftest import SHARED


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def checkpoints(run) -> list[str]:
    return sorted(os.listdir(run / "checkpoints")) if (run / "checkpoints").is_dir() else []


# --- 1. a diverging run stops, names the step, saves nothing after it; results.json is strict JSON ------------------

def test_a_diverging_run_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    proc = run_train(tmp_path, tiny_model_dir, "train.lr=1e6", "train.warmup_ratio=0", "train.save_every=1",
                     "train.max_steps=4")
    assert proc.returncode != 0
    message = last_line(proc)
    assert message.startswith("train.py: NonFiniteLoss: training diverged at step 2: loss nan")
    assert "gradient norm nan" in message and "d8 nan" in message and "Traceback" not in proc.stderr
    run = tmp_path / "run"
    assert checkpoints(run) == ["step_1"]  # the checkpoint before the bad step, complete; nothing after
    assert not (run / "model").exists() and not (run / "results.json").exists()
    weights = load_file(str(run / "checkpoints" / "step_1" / "model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_the_monitor_names_the_first_non_finite_step_and_its_losses():
    monitor = StepMonitor()
    for step, value in enumerate([1.0, 2.0, float("nan"), float("inf")], 1):
        monitor.add(LossParts(torch.tensor(value), {32: torch.tensor(0.5), 8: torch.tensor(value)}))
        monitor.end_step(step, torch.tensor(1.0))
    with pytest.raises(NonFiniteLoss, match=r"at step 3: loss nan, d8 nan\. Stopped"):
        monitor.check()
    finite = StepMonitor()
    finite.add(LossParts(torch.tensor(1.0), {32: torch.tensor(0.5)}))
    finite.end_step(1, torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLoss, match="at step 1: gradient norm inf"):
        finite.check()


def test_non_finite_dim_weights_fail_at_config_load():
    for weights in ("[1, .nan, 1, 1, 1, 1, 1]", "[1, .inf, 1, 1, 1, 1, 1]"):
        with pytest.raises(ValueError, match=r"loss.dim_weights\[1\]: expected a finite number"):
            load_config(None, [f"loss.dim_weights={weights}"])


def test_results_json_stays_strict_json_with_a_nan_score(tmp_path, tiny_encoder):
    results = {"dims": [32], "dev": {"after training": {32: float("nan")}}, "test": {},
               "train": {"steps": 1, "dim_weights": {32: 1.0}}}
    config = load_config(None, ["loss.dims=[32]"]).to_dict()
    write_outputs(str(tmp_path), tiny_encoder, config, results, "cmd", [32])
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and json.loads(text)["dev"]["after training"]["32"] is None
    assert finite_or_null({"a": [float("inf"), 1.0]}) == {"a": [None, 1.0]}


# --- 2. the nested losses have finite gradients where a prefix is exactly zero ------------------------------------

def test_nested_losses_give_finite_gradients_for_an_all_zero_prefix():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(4, 16, dtype=torch.float64, generator=g), torch.randn(4, 16, dtype=torch.float64, generator=g)
    q[0, :8] = 0  # as a ReLU Dense head can make it
    q.requires_grad_()
    contrastive_losses_nested([q, p], dims=[8, 16]).sum().backward()
    assert torch.isfinite(q.grad).all()
    nested_grad, q.grad = q.grad.clone(), None
    per_dim_losses(partial(contrastive_loss, scale=20.0), [q, p], None, [8, 16]).sum().backward()  # the loop
    torch.testing.assert_close(nested_grad[1:], q.grad[1:], rtol=1e-10, atol=1e-12)  # the other rows: equal
    a, b = q.detach().clone().requires_grad_(), p.clone()
    cosent_losses_nested([a, b], torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64), dims=[8, 16]).sum().backward()
    assert torch.isfinite(a.grad).all()


# --- 3. a model folder without tokenizer files is refused -----------------------------------------------------------

def test_a_model_folder_without_tokenizer_files_is_refused(tiny_model_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    with pytest.raises(ValueError, match=r"its tokenizer knows 5 tokens.*tokenizer files missing"):
        Encoder.from_pretrained(str(tmp_path))


# --- 4. a folder holding a run is not reused unless asked; resume refuses another run's checkpoint ---------------

def test_a_finished_run_is_not_overwritten_unless_asked(tmp_path, tiny_model_dir):
    first = run_train(tmp_path, tiny_model_dir, "train.max_steps=4", "train.save_every=2")
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "run"
    results = (run / "results.json").read_text()
    again = run_train(tmp_path, tiny_model_dir, "train.max_steps=2")
    assert again.returncode != 0 and "already holds a run (results.json and checkpoints); pass --overwrite" in last_line(again)
    assert (run / "results.json").read_text() == results and checkpoints(run) == ["step_2", "step_4"]
    overwritten = run_train(tmp_path, tiny_model_dir, "train.max_steps=2", "train.save_every=2", overwrite=True)
    assert overwritten.returncode == 0, overwritten.stderr[-2000:]
    assert checkpoints(run) == ["step_2"]  # the old run's step_4 is gone: --resume latest cannot pick it
    assert json.loads((run / "results.json").read_text())["train"]["steps"] == 2


def test_resume_refuses_a_checkpoint_trained_with_other_settings(tmp_path, tiny_model_dir):
    first = run_train(tmp_path, tiny_model_dir, "train.max_steps=2", "train.save_every=1")
    assert first.returncode == 0, first.stderr[-2000:]
    other = run_train(tmp_path, tiny_model_dir, "train.max_steps=4", "train.lr=1e-3", "loss.dims=[32,8]",
                      resume="latest")
    assert other.returncode != 0
    message = last_line(other)
    assert "was trained with other settings" in message and "train.lr: 2e-05 there, 0.001 here" in message
    assert "loss:" in message  # the dims differ: the loss section is named
    done = run_train(tmp_path, tiny_model_dir, "train.max_steps=2", resume="latest")
    assert done.returncode != 0 and "is at step 2 and this run ends at step 2" in last_line(done)
    longer = run_train(tmp_path, tiny_model_dir, "train.max_steps=4", "train.save_every=1", resume="latest")
    assert longer.returncode == 0, longer.stderr[-2000:]  # more steps of the same training are fine
    assert "resumed from" in longer.stdout and "at step 2" in longer.stdout


# --- 5. a kill during a checkpoint write: --resume latest takes the last complete one -----------------------------

KILLER = """
import os, runpy, signal, sys
import accelerate, torch
saves, save_state, torch_save = [0], accelerate.Accelerator.save_state, torch.save
def killing_save(*args, **kwargs):  # during the chosen checkpoint: one file written, then SIGKILL
    torch_save(*args, **kwargs)
    if saves[0] == int(os.environ["KILL_DURING_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)
def counting_save_state(self, *args, **kwargs):
    saves[0] += 1
    return save_state(self, *args, **kwargs)
accelerate.Accelerator.save_state, torch.save = counting_save_state, killing_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path, tiny_model_dir, monkeypatch):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    monkeypatch.setenv("KILL_DURING_SAVE", "3")
    killed = run_train(tmp_path / "killed", tiny_model_dir, "train.max_steps=4", "train.save_every=1",
                       launcher=(sys.executable, str(killer)))
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "killed" / "run"
    assert checkpoints(run) == ["step_1", "step_2", "step_3.incomplete"]  # killed while writing step 3
    monkeypatch.delenv("KILL_DURING_SAVE")
    resumed = run_train(tmp_path / "killed", tiny_model_dir, "train.max_steps=4", "train.save_every=1",
                        resume="latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in resumed.stdout
    assert checkpoints(run) == ["step_1", "step_2", "step_3", "step_4"]
    whole = run_train(tmp_path / "whole", tiny_model_dir, "train.max_steps=4")
    assert whole.returncode == 0, whole.stderr[-2000:]
    torch.testing.assert_close(encode_saved(run / "model"), encode_saved(tmp_path / "whole" / "run" / "model"),
                               rtol=0, atol=1e-6)


def test_resume_names_an_incomplete_checkpoint_given_by_path(tmp_path, tiny_model_dir):
    incomplete = tmp_path / "run" / "checkpoints" / "step_3.incomplete"
    incomplete.mkdir(parents=True)
    proc = run_train(tmp_path, tiny_model_dir, resume=incomplete)
    assert proc.returncode != 0 and "is not a complete checkpoint" in last_line(proc)


# --- 6. an unwritable output folder fails before the model loads; the final outputs appear together -------------

def test_an_unwritable_output_dir_fails_before_the_model_loads(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_train(blocker, tiny_model_dir)  # output_dir a-file/run: its parent is a file
    assert proc.returncode != 0
    assert "output_dir: cannot write to" in last_line(proc) and "would be lost" in last_line(proc)
    assert "dims, max_seq_length" not in proc.stdout  # the model was not loaded


def test_a_failure_during_the_final_save_leaves_the_previous_outputs_whole(tmp_path, tiny_encoder, monkeypatch):
    config = load_config(None, ["loss.dims=[32]"]).to_dict()
    results = {"dims": [32], "dev": {"after training": {32: 50.0}}, "test": {}, "train": {"dim_weights": {32: 1.0}}}
    write_outputs(str(tmp_path), tiny_encoder, config, results, "first", [32])
    before = {name: (tmp_path / name).read_text() for name in ("results.json", "results.md", "config.yaml")}
    weights = (tmp_path / "model" / "model.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tiny_encoder, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_outputs(str(tmp_path), tiny_encoder, config, {**results, "dev": {}}, "second", [32])
    assert {name: (tmp_path / name).read_text() for name in before} == before
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == weights
    monkeypatch.undo()

    moved = []
    real_replace = os.replace

    def dying_replace(src, dst):  # killed after the model moved: no results.json, so not a finished run
        if moved:
            raise KeyboardInterrupt
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(str(tmp_path), tiny_encoder, config, results, "third", [32])
    assert moved == [str(tmp_path / "model")] and not (tmp_path / "results.json").exists()
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "results.md").exists()  # no old outputs left


# --- 7. values checked at load, naming the field (and for data the file, column and row) --------------------------

@pytest.mark.parametrize("override, message", [
    ("model.max_seq_length=0", "model.max_seq_length: must be >= 1"),
    ("model.max_seq_length=-5", "model.max_seq_length: must be >= 1"),
    ("model.dense_dim=0", "model.dense_dim: must be >= 1"),
    ("train.lr=.nan", "train.lr: expected a finite number"),
    # each kind of check declared beside a field (mrl.run.config.option), in check_fields' words
    ("train.max_steps=0", r"^train\.max_steps: must be >= 1 or null, got 0$"),
    ("train.batch_size=0", r"^train\.batch_size: must be >= 1, got 0$"),
    ("train.warmup_ratio=1", r"^train\.warmup_ratio: must be in \[0, 1\), got 1\.0$"),
    ("train.lr=0", r"^train\.lr: must be > 0, got 0\.0$"),
    ("model.pooling=max", r"^model\.pooling: expected one of mean \| cls \| lasttoken or null, got 'max'$"),
    ("model.lora.save=both", r"^model\.lora\.save: expected merged \| adapter, got 'both'$"),
    ("eval.dims=[]", r"^eval\.dims: needs at least one dimension, got \[\]$"),  # a check that raises
])
def test_bad_values_fail_at_config_load(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_check_fields_runs_the_check_declared_beside_each_field_naming_its_dotted_name():
    @dataclasses.dataclass
    class Inner:
        k: int | None = option(None, at_least(1))
        with_: str = option("a", one_of("a", "b"))

    @dataclasses.dataclass
    class Outer:
        ratio: float = option(0.5, within(0, 1))
        inner: Inner = dataclasses.field(default_factory=Inner)

    check_fields(Outer())  # the defaults pass, None included
    for outer, message in [(Outer(ratio=1.0), r"^ratio: must be in \[0, 1\), got 1\.0$"),
                           (Outer(inner=Inner(k=0)), r"^inner\.k: must be >= 1 or null, got 0$"),
                           (Outer(inner=Inner(with_="c")), r"^inner\.with: expected a \| b, got 'c'$")]:
        with pytest.raises(ValueError, match=message):
            check_fields(outer)


def test_the_model_and_device_are_checked_before_any_data(tiny_model_dir):
    model = Encoder.from_pretrained(str(tiny_model_dir), max_seq_length=600)  # the tiny BERT has 512 positions
    cfg = load_config(None, ["loss.dims=[32,8]"])
    with pytest.raises(ValueError, match="model.max_seq_length: 600 is more than the 512 positions"):
        check_against_model(cfg, model, torch.device("cpu"))
    model.max_seq_length = 512
    check_against_model(cfg, model, torch.device("cpu"))
    with pytest.raises(ValueError, match="train.mixed_precision: fp16 needs a GPU"):
        check_against_model(load_config(None, ["loss.dims=[32,8]", "train.mixed_precision=fp16"]), model,
                            torch.device("cpu"))
    two_d = load_config(None, ["loss.dims=[32,8]", "loss.two_d.enabled=true", "loss.two_d.layers_per_step=2"])
    with pytest.raises(ValueError, match=r"^loss\.two_d\.layers_per_step: must be in 1\.\.1 for a 2-layer model, "
                                         r"got 2$"):
        check_against_model(two_d, model, torch.device("cpu"))


def write_rows(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("bad, shown", [("", "None"), ("high", "'high'"), ("nan", "None")])  # csv nan: None
def test_a_bad_score_names_the_file_column_and_row(tmp_path, bad, shown):
    path = write_rows(tmp_path / "pairs.csv", ["sentence1", "sentence2", "score"],
                      [("a man plays", "someone plays", 4.0), ("a dog", "a cat", bad), ("rain", "sun", 1.0)])
    spec = {"path": "csv", "data_files": {"train": str(path)}, "split": "train", "score_max": 5}
    with pytest.raises(ValueError, match=rf"data.train \(.*pairs.csv\): column 'score' row 1: the score {shown} is "
                                         rf"not a number"):
        load_table(spec, "data.train", needs_label=True)


def test_a_non_utf8_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("sentence1,sentence2,score\ncafé,bar,1.0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"data.train.data_files: .*latin1.csv line 2 is not UTF-8"):
        load_table({"path": "csv", "data_files": {"train": str(path)}, "split": "train"}, "data.train", True)
    gzipped = tmp_path / "latin1.jsonl.gz"
    with gzip.open(gzipped, "wb") as f:
        f.write('{"anchor": "ok", "positive": "ok"}\n{"anchor": "caf\xe9", "positive": "b"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl.gz line 2 is not UTF-8"):
        load_table({"path": "json", "data_files": {"train": str(gzipped)}, "split": "train"}, "data.train")


def test_a_recipe_that_is_not_a_mapping_names_the_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("- train\n- lr\n")
    with pytest.raises(ValueError, match=r"recipe.yaml: a recipe is a mapping of sections"):
        load_config(str(recipe))


def test_set_changes_one_key_of_a_dataset_spec():
    cfg = load_config(None, ["data.train.split=train[:100]", "eval.dev.path=csv"])
    assert cfg.data.train == {"path": "sentence-transformers/stsb", "split": "train[:100]"}
    assert cfg.eval.dev == {"path": "csv", "split": "validation"}
    replaced = load_config(None, ["data.train={path: json, split: train}"])  # a whole value still replaces
    assert replaced.data.train == {"path": "json", "split": "train"}


def test_the_command_line_prints_one_line_and_the_traceback_on_request(tmp_path, tiny_model_dir, monkeypatch):
    proc = run_train(tmp_path, tiny_model_dir, "loss.dims=[64,8]")  # wider than the tiny model
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last_line(proc) == ("train.py: ValueError: loss.dims: dim 64 is larger than the model's embedding size 32  "
                               "(MRL_TRACEBACK=1 shows the traceback)")
    monkeypatch.setenv("MRL_TRACEBACK", "1")
    proc = run_train(tmp_path, tiny_model_dir, "loss.dims=[64,8]")
    assert "Traceback (most recent call last)" in proc.stderr


# --- 8. degenerate training is said, and no-duplicate batching stays linear -----------------------------------------

def test_all_zero_dim_weights_are_warned():
    assert config_warnings(load_config(None, ["loss.dims=[32,8]", "loss.dim_weights=[0,0]"])) == [
        "loss.dim_weights: every weight is 0, so the loss is 0 and nothing trains"]
    assert config_warnings(load_config(None, ["loss.dims=[32,8]", "loss.dim_weights=[0,1]"])) == []


def test_a_cosent_table_with_nothing_to_rank_is_warned(tmp_path):
    path = write_rows(tmp_path / "same.csv", ["sentence1", "sentence2", "score"],
                      [(f"a {i}", f"b {i}", 0.5) for i in range(8)])
    table = load_table({"path": "csv", "data_files": {"train": str(path)}, "split": "train"}, "data.train", True)
    rows = list(zip(table["sentence1"], table["sentence2"]))
    assert degenerate_data(table, "cosent", BatchSampler(rows, 4)) == [
        "data.train: every pair has the same score (0.5): CoSENT has nothing to rank, its loss is 0 and nothing trains"]
    table = table.remove_columns([LABEL]).add_column(LABEL, [i / 8 for i in range(8)])
    assert degenerate_data(table, "cosent", BatchSampler(rows, 4)) == []


def greedy_reference(rows, order, size):
    """The no-duplicates rule as first written: fill one batch at a time from the rows left, in order."""
    remaining, batches = list(order), []
    while remaining:
        batch, seen = [], set()
        for i in remaining:
            if seen.isdisjoint(rows[i]) and len(batch) < size:
                batch.append(i)
                seen.update(rows[i])
        remaining = [i for i in remaining if i not in set(batch)]
        batches.append(batch)
    return batches


def unique_text_batches(rows, order, size):
    """The sampler's no-duplicates batches of rows taken in `order`, as lists."""
    flat, lengths = BatchSampler(rows, size, True)._unique_text_batches(np.array(order), size)
    cuts = [0, *np.cumsum(lengths).tolist()]
    return [flat[a:b].tolist() for a, b in zip(cuts, cuts[1:])]


def nli_rows():
    rows = []
    for name in ("triplets.jsonl.gz", "triplets-extra.jsonl.gz"):
        with gzip.open(SHARED / "data" / "nli" / name, "rt", encoding="utf-8") as f:
            rows += [(r["anchor"], r["positive"], r["negative"]) for r in map(json.loads, f)]
    return rows


@pytest.mark.parametrize("size", [16, 128])
def test_no_duplicate_batches_equal_the_one_batch_at_a_time_rule_on_the_nli_triplets(size):
    if not (SHARED / "data" / "nli").is_dir():
        pytest.skip("no NLI triplets in ../shared")
    rows = nli_rows()[:4000]
    order = list(range(len(rows)))
    random.Random(size).shuffle(order)
    assert unique_text_batches(rows, order, size) == greedy_reference(rows, order, size)


def test_a_table_whose_texts_all_repeat_is_batched_in_one_pass_and_warned(tmp_path):
    rows = [("the same anchor", f"positive {i}", f"negative {i}") for i in range(8000)]
    sampler = BatchSampler(rows, 16, True)
    batches = list(sampler)
    assert len(batches) == 8000 and all(len(b) == 1 for b in batches)  # the rule allows one row per batch
    assert sorted(i for b in batches for i in b) == list(range(8000))
    small = rows[:50]
    assert unique_text_batches(small, list(range(50)), 16) == greedy_reference(small, list(range(50)), 16)
    table_rows = [{"anchor": a, "positive": p, "negative": n} for a, p, n in rows[:200]]
    path = tmp_path / "same.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in table_rows), encoding="utf-8")
    table = load_table({"path": "json", "data_files": {"train": str(path)}, "split": "train"}, "data.train")
    warnings = degenerate_data(table, "contrastive", BatchSampler(rows[:200], 16, True))
    assert warnings == ["data.no_duplicates: texts repeat in the table, so 199 of the 200 batches of an epoch hold "
                        "fewer than 16 rows (the smallest 1): fewer in-batch negatives"]


# --- 9. Encoder.encode refuses what it cannot embed ------------------------------------------------------------------

@pytest.mark.parametrize("texts, kwargs, error, message", [
    (None, {}, TypeError, "encode expects a list of texts, got NoneType"),
    (["a dog", None, "rain"], {}, TypeError, r"texts\[1\]: expected a string, got None"),
    (["a dog", 3], {}, TypeError, r"texts\[1\]: expected a string, got 3"),
    (["a dog"], {"batch_size": 0}, ValueError, "batch_size: expected an integer >= 1, got 0"),
    (["a dog"], {"truncate_dim": True}, ValueError, "truncate_dim: expected an integer in 1..32, got True"),
    (["a dog"], {"truncate_dim": 8.0}, ValueError, "truncate_dim: expected an integer in 1..32, got 8.0"),
])
def test_encode_refuses_bad_input_naming_it(tiny_encoder, texts, kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_encoder.encode(texts, **kwargs)
