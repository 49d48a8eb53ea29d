"""train.py end to end on the tiny random model: a few steps run and write every output; bad configs fail early."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
STSB = SHARED / "data" / "stsb"


def run_train(tmp_path, model_dir, *overrides):
    spec = f"{{path: csv, data_files: {{train: {STSB}/train.csv}}, split: 'train[:64]', score_max: 5}}"
    dev = f"{{path: csv, data_files: {{train: {STSB}/dev.csv}}, split: 'train[:40]', score_max: 5}}"
    args = [sys.executable, "train.py", "--set", f"model.name={model_dir}", "--set", f"data.train={spec}",
            "--set", f"eval.dev={dev}", "--set", "eval.test=null", "--set", "loss.dims=[32,16,8]",
            "--set", "train.max_steps=3", "--set", "train.batch_size=8", "--set", f"output_dir={tmp_path}/run",
            *[a for o in overrides for a in ("--set", o)]]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


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
