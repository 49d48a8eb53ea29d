"""Training on a mixture of datasets: every batch (every step, over processes) from one dataset, in proportion
to the weights or in turn; one dataset alone batches exactly as before; a mixed run trains CoSENT on scored
pairs and MNRL on triplets, logs each dataset apart, and resumes where the uninterrupted run would be."""

import json
from collections import Counter

import pytest

from mrl.run.config import load_config
from mrl.data import BatchSampler
from mrl.data.mixture import MixtureBatchSampler
from test_train import STSB, encode_saved, read_scalars, train_py

from conftest import SHARED


def rows(prefix, n):
    return [(f"{prefix} anchor {i}", f"{prefix} positive {i}") for i in range(n)]


def which(batch, offsets):
    return max(d for d, offset in enumerate(offsets) if offset <= batch[0])


@pytest.mark.parametrize("processes", [1, 2])
def test_every_step_comes_from_one_dataset_in_proportion_to_the_weights(processes):
    samplers = [BatchSampler(rows("a", 80), 4, True, processes=processes),
                BatchSampler(rows("b", 40), 4, True, processes=processes)]
    mixture = MixtureBatchSampler(samplers, [1.0, 2.0], "proportional", seed=0, processes=processes)
    batches = list(mixture)
    sources = [which(b, mixture.offsets) for b in batches]
    assert all(len(set(which(b, mixture.offsets) for b in batch_group)) == 1 and
               all(set(b) <= set(range(mixture.offsets[d], mixture.offsets[d] + samplers[d].n_rows))
                   for b, d in zip(batch_group, [sources[i]] * processes))
               for i, batch_group in ((i, batches[i:i + processes]) for i in range(0, len(batches), processes)))
    steps = Counter(sources[::processes])
    assert steps == {0: 20 // processes, 1: 2 * 10 // processes}  # weight 2: the small dataset twice over
    assert sources[:10] != sorted(sources[:10])  # interleaved at random, not one dataset then the other
    assert list(mixture) == batches  # the same epoch, the same batches: what resume needs
    mixture.set_epoch(1)
    assert list(mixture) != batches


def test_no_text_repeats_within_a_step_over_processes():
    """The no-duplicates rule of each dataset holds over the P batches of a step, as with one dataset."""
    repeating = [[(f"{p} text {i % 7}", f"{p} other {i}") for i in range(60)] for p in ("a", "b")]
    samplers = [BatchSampler(data, 3, True, seed=1, processes=2) for data in repeating]
    mixture = MixtureBatchSampler(samplers, [1.0, 1.0], "proportional", seed=1, processes=2)
    table = [row for data in repeating for row in data]
    batches = list(mixture)
    assert len(batches) % 2 == 0
    for step in range(0, len(batches), 2):
        texts = [t for b in batches[step:step + 2] for i in b for t in table[i]]
        assert len(texts) == len(set(texts)), step
    rows = [i for b in batches for i in b]
    assert len(rows) == len(set(rows))  # weight 1: one pass, no row twice
    left_out = [mixture.left_out(d) for d in range(2)]
    assert len(rows) == len(table) - sum(left_out) and all(n < 2 for n in left_out)  # a last step of < P rows


def test_round_robin_takes_the_datasets_in_turn():
    samplers = [BatchSampler(rows("a", 12), 4), BatchSampler(rows("b", 20), 4)]
    mixture = MixtureBatchSampler(samplers, [1.0, 1.0], "round_robin")
    assert [which(b, mixture.offsets) for b in mixture] == [0, 1, 0, 1, 0, 1, 1, 1]


@pytest.mark.parametrize("no_duplicates", [False, True])
def test_one_dataset_alone_batches_exactly_as_the_plain_sampler(no_duplicates):
    data = [(f"text {i % 37}", f"other {i}") for i in range(100)]  # repeats, for no_duplicates
    for epoch in (0, 1):
        plain, mixture = BatchSampler(data, 8, no_duplicates, seed=3), MixtureBatchSampler(
            [BatchSampler(data, 8, no_duplicates, seed=3)], [1.0], seed=3)
        plain.set_epoch(epoch)
        mixture.set_epoch(epoch)
        assert list(mixture) == list(plain)


def test_a_dataset_smaller_than_the_processes_is_named():
    mixture = MixtureBatchSampler([BatchSampler(rows("a", 8), 4, processes=2), BatchSampler(rows("b", 1), 4,
                                                                                            processes=2)], [1.0, 1.0],
                                  processes=2)
    with pytest.raises(ValueError, match=r"dataset 1 has fewer rows \(1\) than processes \(2\)"):
        list(mixture)


def test_a_fractional_weight_takes_part_of_a_pass():
    mixture = MixtureBatchSampler([BatchSampler(rows("a", 40), 4), BatchSampler(rows("b", 40), 4)], [1.0, 0.5])
    assert Counter(which(b, mixture.offsets) for b in mixture) == {0: 10, 1: 5}


def test_bad_mixture_settings_fail_at_config_load():
    spec = "{path: csv, split: train}"
    with pytest.raises(ValueError, match="data.train.b.weight: expected a number > 0"):
        load_config(None, [f"data.train={{a: {spec}, b: {{path: csv, split: train, weight: 0}}}}"])
    with pytest.raises(ValueError, match=r"data.train.b.loss: expected one of \['contrastive', 'cosent'\]"):
        load_config(None, [f"data.train={{a: {spec}, b: {{path: csv, split: train, loss: triplet}}}}"])
    with pytest.raises(ValueError, match="data.mixture: expected proportional | round_robin"):
        load_config(None, ["data.mixture=shuffled"])


def mixture_settings(tmp_path):
    nli = SHARED / "data" / "nli" / "triplets.jsonl.gz"
    if not nli.is_file():
        pytest.skip("no NLI triplets in ../shared")
    sts = f"{{path: csv, data_files: {{train: {STSB}/train.csv}}, split: 'train[:48]', score_max: 5, loss: cosent}}"
    triplets = (f"{{path: json, data_files: {{train: {nli}}}, split: 'train[:48]', loss: contrastive, "
                f"columns: [anchor, positive, negative], weight: 1}}")
    return (f"data.train={{sts: {sts}, nli: {triplets}}}", "loss.dims=[32,16,8]", "train.batch_size=8",
            "eval.test=null", f"eval.dev={{path: csv, data_files: {{train: {STSB}/dev.csv}}, split: 'train[:40]', "
                              "score_max: 5}", "log.every=1", "log.with=tensorboard")


def test_a_mixed_run_trains_each_dataset_with_its_loss_and_logs_each(tmp_path, tiny_model_dir):
    proc = train_py(f"model.name={tiny_model_dir}", *mixture_settings(tmp_path), "train.max_steps=8",
                    f"output_dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sts: 48 rows, text columns ['sentence1', 'sentence2'], label" in proc.stdout
    assert "nli: 48 rows, text columns ['anchor', 'positive', 'negative']" in proc.stdout
    scalars = read_scalars(tmp_path / "run")
    steps = {source: [s for s, _ in scalars.get(f"train/loss/{source}/loss", [])] for source in ("sts", "nli")}
    assert steps["sts"] and steps["nli"] and not set(steps["sts"]) & set(steps["nli"])  # one source a step
    assert sorted(steps["sts"] + steps["nli"]) == list(range(1, 9))
    assert "train/loss/nli/d8" in scalars and "train/loss/sts/d8" in scalars
    assert json.loads((tmp_path / "run" / "results.json").read_text())["train"]["steps"] == 8


def test_a_mixed_run_resumes_where_the_uninterrupted_run_would_be(tmp_path, tiny_model_dir):
    settings = mixture_settings(tmp_path)
    whole = train_py(f"model.name={tiny_model_dir}", *settings, "train.max_steps=6", "train.save_every=3",
                     f"output_dir={tmp_path}/whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed = train_py(f"model.name={tiny_model_dir}", *settings, "train.max_steps=6", f"output_dir={tmp_path}/resumed",
                       resume=tmp_path / "whole" / "checkpoints" / "step_3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    import torch

    torch.testing.assert_close(encode_saved(tmp_path / "resumed" / "model"), encode_saved(tmp_path / "whole" / "model"),
                               rtol=0, atol=1e-6)


def test_the_mixture_recipe_runs_offline_through_the_mirror(tmp_path, tiny_model_dir):
    from test_train import run_nli_recipe

    proc = run_nli_recipe(tmp_path, "configs/mixture-nli-sts.yaml", tiny_model_dir, "train.batch_size=8",
                          "train.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nli: " in proc.stdout and "sts: " in proc.stdout
    assert "MatryoshkaLoss" in proc.stdout and proc.stdout.count("MatryoshkaLoss(") >= 2  # one objective per loss


def test_two_processes_train_a_mixture_with_a_teacher_masking_and_learned_weights(tmp_path, tiny_model_dir):
    """A CoSENT dataset beside a contrastive one whose rows bring teacher embeddings, on 2 processes: cross-device
    negatives, false-negative masking and the teacher act on the contrastive dataset only; learned dim weights of
    the objective a step does not use get no gradient there."""
    import gzip

    import torch

    from test_train import TWO_PROCESSES

    nli = SHARED / "data" / "nli" / "triplets.jsonl.gz"
    if not nli.is_file():
        pytest.skip("no NLI triplets in ../shared")
    g = torch.Generator().manual_seed(0)
    with gzip.open(nli, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(48))]
    path = tmp_path / "with-teacher.jsonl"
    path.write_text("\n".join(json.dumps({**{c: r[c] for c in ("anchor", "positive", "negative")},
                                          **{f"{c}.teacher": torch.randn(32, generator=g).tolist()
                                             for c in ("anchor", "positive", "negative")}}) for r in rows))
    sts = f"{{path: csv, data_files: {{train: {STSB}/train.csv}}, split: 'train[:48]', score_max: 5, loss: cosent}}"
    triplets = f"{{path: json, data_files: {{train: {path}}}, split: train, loss: contrastive}}"
    proc = train_py(f"model.name={tiny_model_dir}", f"data.train={{sts: {sts}, nli: {triplets}}}", "loss.dims=[32,16]",
                    "train.batch_size=8", "train.max_steps=4", "eval.dev=null", "eval.test=null",
                    "loss.teacher.model=data", "loss.false_negative_margin=0.0", "loss.dim_weights=learned",
                    f"output_dir={tmp_path}/run", launcher=TWO_PROCESSES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "negatives from every process" in proc.stdout and "TeacherDistillation" in proc.stdout
    assert "warning: loss.teacher: sts has no teacher embeddings" in proc.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["train"]["processes"] == 2
