"""Distillation from a teacher into every prefix (loss.teacher): the KL from the teacher's in-batch similarity
distribution to each prefix's and the MSE to the teacher's truncated embeddings, against a float64 formula;
teacher embeddings computed before training or read from the data, with GradCache."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mrl.run.config import load_config
from mrl.loss.objective import Objective
from test_train import STSB, train_py


def columns(seed, n=2, batch=5, width=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, width, generator=g, dtype=torch.float64) for _ in range(n)]


def reference(student, teacher, dims, kl_weight, mse_weight, tau):
    """CoSENT-free part by hand: per dim, KL over each anchor's candidates (softmax by hand, teacher at its full
    width, detached) and the MSE of re-normalised prefixes."""
    def softmax(x):
        e = torch.exp(x / tau - (x / tau).max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)

    def scores(cols, d):
        q, c = F.normalize(cols[0][:, :d], dim=-1), F.normalize(torch.cat(cols[1:])[:, :d], dim=-1)
        return q @ c.T

    width_t = teacher[0].shape[-1]
    p = softmax(scores([t.detach() for t in teacher], width_t))
    total = 0.0
    for d in dims:
        q = softmax(scores(student, d))
        total = total + kl_weight * (p * (p.log() - q.log())).sum(-1).mean()
        total = total + mse_weight * sum(((F.normalize(s[:, :d], dim=-1) - F.normalize(t[:, :d], dim=-1)) ** 2)
                                         .sum(-1).mean() for s, t in zip(student, teacher)) / len(student)
    return total


@pytest.mark.parametrize("kl_weight, mse_weight", [(1.0, 0.0), (0.5, 2.0), (0.0, 1.0)])
def test_teacher_distillation_equals_the_float64_formula(kl_weight, mse_weight):
    student = [c.requires_grad_() for c in columns(0)]
    teacher = columns(1)
    base = load_config(None, ["loss.name=contrastive", "loss.dims=[16,8,4]"]).loss
    plain = Objective(base, 16)(student).total
    settings = ["loss.name=contrastive", "loss.dims=[16,8,4]", "loss.teacher.model=data",
                f"loss.teacher.kl_weight={kl_weight}", f"loss.teacher.mse_weight={mse_weight}",
                "loss.teacher.temperature=0.1"]
    parts = Objective(load_config(None, settings).loss, 16)(student, teacher=teacher)
    total = parts.total
    expected = plain + reference(student, teacher, [16, 8, 4], kl_weight, mse_weight, 0.1)
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(total, student), torch.autograd.grad(expected, student),
                               rtol=1e-9, atol=1e-12)
    assert ("teacher_kl_d8" in parts.terms) == (kl_weight > 0) and ("teacher_mse_d4" in parts.terms) == (mse_weight > 0)
    assert list(parts.per_dim) == [16, 8, 4]


def test_a_narrower_teacher_gives_its_distribution_but_no_mse():
    student, teacher = columns(2), columns(3, width=8)
    config = load_config(None, ["loss.name=contrastive", "loss.dims=[16,8]", "loss.teacher.model=data"]).loss
    parts = Objective(config, 16)(student, teacher=teacher)
    assert math.isfinite(float(parts.total)) and "teacher_kl_d16" in parts.terms
    assert not any(key.startswith("teacher_mse") for key in parts.terms)  # mse_weight 0: no MSE term
    config = load_config(None, ["loss.name=contrastive", "loss.dims=[16,8]", "loss.teacher.model=data",
                                "loss.teacher.mse_weight=1"]).loss
    with pytest.raises(ValueError, match="the teacher's width 8 is not the student's 16"):
        Objective(config, 16)(student, teacher=teacher)


def test_a_run_distils_a_teacher_computed_before_training_through_gradcache(tmp_path, tiny_model_dir, minilm_dir):
    spec = f"{{path: csv, data_files: {{train: {STSB}/train.csv}}, split: 'train[:32]', score_max: 5}}"
    proc = train_py(f"model.name={tiny_model_dir}", f"data.train={spec}", "loss.dims=[32,16]", "train.max_steps=2",
                    "train.batch_size=8", "train.cache_chunk_size=6", "eval.dev=null", "eval.test=null",
                    f"loss.teacher.model={minilm_dir}", "loss.teacher.mse_weight=0", "log.every=1",
                    "log.with=tensorboard", f"output_dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TeacherDistillation" in proc.stdout
    from test_train import read_scalars

    scalars = read_scalars(tmp_path / "run")  # the teacher's term was computed, every step, at every dim
    for d in (32, 16):
        values = [v for _, v in scalars[f"train/loss/teacher_kl_d{d}"]]
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)


def test_a_run_reads_teacher_embeddings_stored_in_the_data(tmp_path, tiny_model_dir):
    g = torch.Generator().manual_seed(0)
    rows = [{"sentence1": f"a man plays guitar number {i}", "sentence2": f"someone plays music {i}", "score": i % 5,
             "sentence1.teacher": torch.randn(32, generator=g).tolist(),
             "sentence2.teacher": torch.randn(32, generator=g).tolist()} for i in range(16)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    spec = f"{{path: json, data_files: {{train: {path}}}, split: train, score_max: 5}}"
    proc = train_py(f"model.name={tiny_model_dir}", f"data.train={spec}", "loss.dims=[32,16]", "train.max_steps=2",
                    "train.batch_size=8", "eval.dev=null", "eval.test=null", "loss.teacher.model=data",
                    "loss.teacher.mse_weight=1", f"output_dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = train_py(f"model.name={tiny_model_dir}", "loss.dims=[32,16]", "train.max_steps=1", "eval.dev=null",
                       "eval.test=null", "loss.teacher.model=data", f"output_dir={tmp_path}/missing")
    assert missing.returncode != 0 and "has no teacher embeddings for its columns" in missing.stderr
