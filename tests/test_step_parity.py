"""train.py's loop equals the reference trainer's, step for step: with dropout off, in float64, on the same
batches in the same order, mrl (train.py itself, in a subprocess) and sentence-transformers'
SentenceTransformerTrainer end with the same parameters after one epoch of 8-9 optimiser steps that include
warm-up, linear decay, weight decay and gradient clipping.

The two differ in one default, set to mrl's here: weight decay (mrl 0.01 on every matrix; the reference
trainer's default is 0; both exempt biases and LayerNorm weights). Skipped where sentence-transformers is absent.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from mrl import Encoder
from mrl.run.config import load_config
from mrl.data import BatchSampler, load_table, text_columns
from test_train import STSB, train_py

from conftest import SHARED

STEPS, BATCH, LR = 8, 8, 1e-3  # 8 steps of 8 rows: the 64 rows of one epoch; a large rate, so the steps move far


def st_model(tiny_model_dir, tmp_path):
    """The tiny BERT with dropout off, saved by mrl in the sentence-transformers layout (mean pooling, Normalize)."""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    folder = tmp_path / "no-dropout"
    folder.mkdir()
    for path in tiny_model_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "config.json").write_text(json.dumps(config))
    saved = tmp_path / "start"
    Encoder.from_pretrained(str(folder)).save(str(saved))
    return saved


def reference_run(model_dir, table, batches, loss_name, out_dir, warmup_ratio):
    """SentenceTransformerTrainer on `table`, fed exactly `batches` (row indices, in order), in float64."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses

    model = st.SentenceTransformer(str(model_dir), device="cpu").double()
    base = (losses.CoSENTLoss(model, scale=20.0) if loss_name == "cosent"
            else losses.MultipleNegativesRankingLoss(model, scale=20.0))
    loss = losses.MatryoshkaLoss(model, base, matryoshka_dims=[32, 16, 8])
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
        warmup_ratio=warmup_ratio, weight_decay=0.01,  # mrl's weight decay; the reference's default is 0
        max_grad_norm=1.0, lr_scheduler_type="linear", seed=0, use_cpu=True, save_strategy="no", report_to="none",
        batch_sampler=lambda dataset, **kwargs: batches)  # mrl's batches, in mrl's order
    data = table.rename_column("label", "score") if loss_name == "cosent" else table
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss).train()
    return {name: p.detach() for name, p in model[0].auto_model.named_parameters()}


def mrl_run(model_dir, spec, config, out_dir, warmup_ratio, steps, *overrides):
    proc = train_py(f"model.name={model_dir}", f"data.train={spec}", "model.dtype=float64", f"train.lr={LR}",
                    f"train.batch_size={BATCH}", f"train.warmup_ratio={warmup_ratio}", "loss.dims=[32,16,8]",
                    "eval.dev=null", "eval.test=null", f"output_dir={out_dir}", *overrides, config=config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out_dir / "results.json").read_text())["train"]["steps"] == steps
    return load_file(str(out_dir / "model" / "model.safetensors"))


def assert_same_parameters(mine: dict, reference: dict, start: dict):
    assert set(mine) == set(reference)
    moved = 0.0
    for name, value in reference.items():
        torch.testing.assert_close(mine[name], value, rtol=1e-9, atol=1e-12, msg=name)
        moved = max(moved, (value - start[name].double()).abs().max().item())
    assert moved > 1e-3  # the steps moved the weights, far beyond the tolerance


@pytest.mark.parametrize("warmup_ratio", [0.25, 0.3])  # 2 warm-up steps, and 2.4 rounded up to 3 by both
def test_cosent_in_matryoshka_steps_like_the_reference_trainer(tmp_path, tiny_model_dir, warmup_ratio):
    model_dir = st_model(tiny_model_dir, tmp_path)
    spec = f"{{path: csv, data_files: {{train: {STSB}/train.csv}}, split: 'train[:64]', score_max: 5}}"
    table = load_table(load_config(None, [f"data.train={spec}"]).data.train, "data.train", needs_label=True)
    batches = list(BatchSampler(list(zip(*(table[c] for c in text_columns(table)))), BATCH, seed=0))
    start = load_file(str(model_dir / "model.safetensors"))
    assert len(batches) == STEPS
    mine = mrl_run(model_dir, spec, "configs/default.yaml", tmp_path / "mrl", warmup_ratio, STEPS)
    reference = reference_run(model_dir, table, batches, "cosent", tmp_path / "reference", warmup_ratio)
    assert_same_parameters(mine, reference, start)


def test_mnrl_with_hard_negatives_in_matryoshka_steps_like_the_reference_trainer(tmp_path, tiny_model_dir):
    if not (SHARED / "data" / "nli").is_dir():
        pytest.skip("no NLI triplets in ../shared")
    model_dir = st_model(tiny_model_dir, tmp_path)
    path = SHARED / "data" / "nli" / "triplets.jsonl.gz"
    spec = f"{{path: json, data_files: {{train: {path}}}, split: 'train[:64]', columns: [anchor, positive, negative]}}"
    table = load_table(load_config(None, [f"data.train={spec}"]).data.train, "data.train")
    rows = list(zip(*(table[c] for c in text_columns(table))))
    batches = list(BatchSampler(rows, BATCH, no_duplicates=True, seed=0))  # a premise repeats: 9 batches
    start = load_file(str(model_dir / "model.safetensors"))
    mine = mrl_run(model_dir, spec, "configs/nli-matryoshka.yaml", tmp_path / "mrl", 0.25, len(batches),
                   "train.mixed_precision=no", "model.max_seq_length=75")
    reference = reference_run(model_dir, table, batches, "contrastive", tmp_path / "reference", 0.25)
    assert_same_parameters(mine, reference, start)
