"""train.py with loss.quantisation: ranges calibrated on training texts by the initial model before training, kept
through a resume, recorded in the saved folder with the precisions; STS at each precision and the card's retention
table; a bad setting fails in one line before the model loads."""

import json

import torch
import torch.nn.functional as F

from mrl import Encoder
from mrl.data.tables import load_table
from mrl.run.config import load_config
from mrl.run.quantisation import calibration_texts
from test_train import STSB, encode_saved, run_train, train_py

OPTIONS = ("loss.quantisation.int8=1.0", "loss.quantisation.int4=0.5", "loss.quantisation.binary=0.5",
           "loss.quantisation.regulariser=spread_out", "loss.quantisation.regulariser_weight=0.1",
           "loss.quantisation.calibration_rows=50", "train.max_steps=4", "log.every=1")


def test_a_run_calibrates_records_and_resumes_with_the_same_ranges(tmp_path, tiny_model_dir):
    whole = run_train(tmp_path / "whole", tiny_model_dir, *OPTIONS, "train.save_every=2")
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "whole" / "run"
    record = json.loads((run / "model" / "quantisation.json").read_text())
    assert record["precisions"] == ["int8", "int4", "binary"] and record["levels"] == {"int8": 255, "int4": 15,
                                                                                      "binary": 2}
    assert record["weights"] == {"int8": 1.0, "int4": 0.5, "binary": 0.5} and record["regulariser"] == "spread_out"

    # the ranges: each coordinate's max |x| over 50 training texts, embedded by the initial model, unit-normalised
    spec = f"{{path: csv, data_files: {{train: {STSB}/train.csv}}, split: 'train[:64]', score_max: 5}}"
    config = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={spec}", *OPTIONS])
    table = load_table(config.data.train, "data.train", needs_label=True)  # run_train's 64 STS-B pairs
    initial = Encoder.from_pretrained(str(tiny_model_dir))
    texts = calibration_texts(config, {"train": table}, initial)
    assert len(texts) == 50 and len({t for _, t in texts}) == 50 and all(p == "" for p, _ in texts)
    unit = F.normalize(initial.encode([t for _, t in texts], normalize=False), dim=-1)
    torch.testing.assert_close(torch.tensor(record["ranges"]), unit.abs().amax(0), rtol=1e-5, atol=1e-7)

    results = json.loads((run / "results.json").read_text())
    for precision in ("int8", "int4", "binary"):
        assert set(results["dev"][f"after training, {precision}"]) == {"32", "16", "8"}
    card = (run / "model" / "README.md").read_text()
    assert "## Quantisation" in card and "| % of float32 at d=32 |" in card and "| binary |" in card
    assert "quantisation-aware: every trained prefix also stored as int8 (weight 1), int4 (weight 0.5)" in card
    assert "spread_out regulariser, weight 0.1" in card

    resumed = run_train(tmp_path / "resumed", tiny_model_dir, *OPTIONS, resume=run / "checkpoints" / "step_2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((tmp_path / "resumed" / "run" / "model" / "quantisation.json").read_text())
    assert again["ranges"] == record["ranges"]  # from the checkpoint: a resumed run does not calibrate
    torch.testing.assert_close(encode_saved(tmp_path / "resumed" / "run" / "model"), encode_saved(run / "model"),
                               rtol=0, atol=1e-6)


def test_the_default_run_writes_no_record(tmp_path, tiny_model_dir):
    proc = run_train(tmp_path, tiny_model_dir, "train.max_steps=1", "eval.dev=null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "model" / "quantisation.json").exists()
    assert "## Quantisation" not in (tmp_path / "run" / "model" / "README.md").read_text()


def test_a_bad_setting_fails_in_one_line_before_the_model_loads(tmp_path):
    for setting, field in (("loss.quantisation.int4=-2", "loss.quantisation.int4: must be >= 0"),
                           ("loss.quantisation.range=inf", "loss.quantisation.range: expected a finite number"),
                           ("loss.quantisation.fp8=1", "loss.quantisation.fp8: unknown config key")):
        proc = train_py("model.name=/nonexistent/model", "loss.quantisation.int8=1", setting,
                        f"output_dir={tmp_path}/run")
        assert proc.returncode != 0 and field in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and "nonexistent" not in proc.stderr


def test_calibration_draws_distinct_texts_without_reading_the_whole_table(tmp_path, tiny_model_dir):
    import datasets
    from mrl.data.stream import Stream

    initial = Encoder.from_pretrained(str(tiny_model_dir))
    texts = [f"text {i % 7}" for i in range(300)]  # 7 distinct texts, each cell repeated
    table = datasets.Dataset.from_dict({"anchor": texts, "positive": texts[::-1]})
    config = load_config(None, [f"model.name={tiny_model_dir}", "loss.quantisation.int8=1",
                                "loss.quantisation.calibration_rows=50"])
    drawn = calibration_texts(config, {"train": table}, initial)  # fewer distinct texts than asked: all of them
    assert sorted(t for _, t in drawn) == sorted(set(texts)) and all(p == "" for p, _ in drawn)

    unique = datasets.Dataset.from_dict({"anchor": [f"a{i}" for i in range(5000)],
                                         "positive": [f"p{i}" for i in range(5000)]})
    first, again = (calibration_texts(config, {"train": unique}, initial) for _ in range(2))
    other = calibration_texts(load_config(None, [f"model.name={tiny_model_dir}", "loss.quantisation.int8=1",
                                                 "loss.quantisation.calibration_rows=50", "train.seed=1"]),
                              {"train": unique}, initial)
    assert first == again and first != other and len(set(first)) == 50
    assert {t[0] for _, t in first} == {"a", "p"}  # drawn from both columns

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"anchor": f"q{i % 3}", "positive": f"d{i}"}) + "\n" for i in range(40)))
    stream = Stream({"path": "json", "data_files": {"train": str(path)}, "split": "train"}, "data.train")
    streaming = load_config(None, [f"model.name={tiny_model_dir}", "loss.quantisation.int8=1",
                                   "loss.quantisation.calibration_rows=50", "data.streaming=true", "train.max_steps=1"])
    streamed = calibration_texts(streaming, {"train": stream}, initial)  # its first distinct texts, as read
    assert [t for _, t in streamed] == ["q0", "d0", "q1", "d1", "q2", "d2"] + [f"d{i}" for i in range(3, 40)]
