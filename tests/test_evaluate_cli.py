"""python -m mrl.eval: per-dim STS and retrieval of saved models, the tables and the two plots."""

import json

import pytest

from conftest import SHARED
from mrl.eval.evaluate import default_dims, main

STSB = SHARED / "data" / "stsb"


@pytest.fixture
def beir_folder(tmp_path):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = ["a man plays the guitar", "a dog runs in the park", "it is raining", "the market is busy",
            "children play football", "a cat sleeps on the sofa"]
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": f"d{i}", "text": t}) for i, t in enumerate(docs)))
    (folder / "queries.jsonl").write_text('{"_id": "q0", "text": "music"}\n{"_id": "q1", "text": "a pet"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq1\td5\t2\n")
    return folder


def test_default_dims():
    assert default_dims(384) == [384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8]
    assert default_dims(32) == [32, 16, 8]


def test_cli_evaluates_models_and_writes_tables_and_plots(tmp_path, tiny_model_dir, beir_folder):
    pytest.importorskip("matplotlib")
    sts = f"{{path: csv, data_files: {{test: {STSB}/test.csv}}, split: 'test[:60]', score_max: 5}}"
    out = tmp_path / "out"
    main(["--model", str(tiny_model_dir), "--model", str(tiny_model_dir), "--name", "a", "--name", "b",
          "--sts", sts, "--beir", str(beir_folder), "--dims", "32", "16", "8", "--quantization", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"a", "b"}
    assert set(results["a"]["sts"]) == {"32", "16", "8"}
    assert results["a"]["sts"] == results["b"]["sts"]  # the same model twice
    assert set(results["a"]["retrieval"]["16"]) == {"ndcg@10", "mrr@10", "recall@10", "recall@100"}
    assert results["a"]["retrieval"]["32"]["recall@100"] == 100.0  # 6 documents: all of them are in the top 100
    kinds = {q["storage"] for q in results["a"]["quantization"]}
    assert {"float32", "int8", "int4", "binary", "int4 + float rescoring of top 4×100"} <= kinds
    assert len(results["a"]["quantization"]) == 3 * 7  # float32; int8, int4, binary, each with and without rescoring
    assert all(q["recall@100"] == 100.0 for q in results["a"]["quantization"])  # 6 documents
    assert set(results["a"]["sts_precisions"]) == {"int8", "int8, rescored", "int4", "int4, rescored", "binary",
                                                   "binary, rescored"}
    assert set(results["a"]["sts_precisions"]["int4"]) == {"32", "16", "8"}
    markdown = (out / "results.md").read_text()
    assert "## STS × precision: a" in markdown and "| % of float32 at d=32 |" in markdown
    assert "## STS: Spearman ×100 per dim" in markdown and "## Retrieval: ndcg@10" in markdown
    assert "Quantisation × truncation: a" in markdown
    for png in ("sts.png", "sts_relative.png", "retrieval_ndcg.png", "retrieval_ndcg_relative.png"):
        assert (out / png).stat().st_size > 1000 and png in markdown


def test_cli_plots_train_results(tmp_path):
    pytest.importorskip("matplotlib")
    runs = []
    for name, scores in (("m", {"32": 80.0, "8": 70.0}), ("b", {"32": 81.0, "8": 50.0})):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"dev": {"after training": scores}, "test": {"after training": scores}}))
        runs.append(str(path))
    main(["--from-results", *runs, "--name", "Matryoshka", "--name", "baseline", "--out", str(tmp_path / "plots")])
    markdown = (tmp_path / "plots" / "results.md").read_text()
    assert "| Matryoshka | 80.00 | 70.00 |" in markdown and "| baseline | 81.00 | 50.00 |" in markdown
    assert (tmp_path / "plots" / "sts_relative.png").exists()


def test_cli_needs_models_or_results(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])
