"""MTEB at every dim × precision (python -m mrl.mteb), offline: local MTEB tasks built from ../shared (STS-B
test pairs as an STS task, NLI triplets as a retrieval task) score exactly what mrl's own evaluators score on the
same pairs and corpus, at each dim and precision; two dims never share a cached result; the command's outputs,
card and errors. Only mteb's public API is used. Skipped without mteb (pip install -e .[mteb]).
"""

import csv
import gzip
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

mteb = pytest.importorskip("mteb")

from mrl import Encoder, evaluate_sts  # noqa: E402
from mrl.eval.mteb import FullWidth, MatryoshkaModel, evaluate_mteb, main, model_meta, stored  # noqa: E402
from mrl.eval.mteb_local import retrieval_task, sts_task  # noqa: E402
from mrl.retrieval.data import nli_retrieval_set  # noqa: E402
from mrl.retrieval.metrics import evaluate_retrieval, rankings_from, retrieval_metrics  # noqa: E402
from mrl.retrieval.quantize import quantized_search  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIMS = [384, 128, 32]
ROUNDED = 5e-4 + 1e-9  # mteb reports retrieval metrics rounded to 5 decimals (×100: to 0.001)


@pytest.fixture(scope="module")
def sts_pairs(shared_dir):
    path = shared_dir / "data" / "stsb" / "test.csv"
    if not path.is_file():
        pytest.skip(f"no STS-B at {path}")
    with open(path, encoding="utf-8") as f:
        rows = list(itertools.islice(csv.DictReader(f), 200))
    return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [float(r["score"]) for r in rows]


@pytest.fixture(scope="module")
def triplets_file(shared_dir, tmp_path_factory):
    """The first 300 SNLI triplets (about 570 documents; 100 queries)."""
    path = shared_dir / "data" / "nli" / "triplets.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"no NLI triplets at {path}")
    out = tmp_path_factory.mktemp("nli") / "triplets.jsonl"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        out.write_text("".join(itertools.islice(f, 300)), encoding="utf-8")
    return str(out)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return Encoder.from_pretrained(str(minilm_dir))


def by_dim(result: dict, task, precision="float32") -> dict[int, float]:
    return {int(k[1:].split("/")[0]): v for k, v in result["scores"][task.metadata.name].items()
            if k.endswith("/" + precision)}


@pytest.mark.integration
def test_mteb_sts_equals_mrl_spearman_at_every_dim(minilm, sts_pairs, tmp_path):
    s1, s2, gold = sts_pairs
    task = sts_task(s1, s2, gold)
    result = evaluate_mteb(minilm, [task], DIMS, ["float32"], "local/minilm", "r0", mteb.ResultCache(str(tmp_path)))
    from datasets import Dataset

    ours = evaluate_sts(minilm, Dataset.from_dict({"sentence1": s1, "sentence2": s2, "label": gold}), DIMS)
    mteb_scores = by_dim(result, task)
    assert mteb_scores.keys() == ours.keys()
    for d in DIMS:
        assert mteb_scores[d] == pytest.approx(ours[d], abs=1e-9), d
    assert len(set(mteb_scores.values())) == len(DIMS)  # each dim its own score


@pytest.mark.integration
def test_mteb_retrieval_equals_mrl_ndcg_at_every_dim_and_precision(minilm, triplets_file, tmp_path):
    data = nli_retrieval_set([triplets_file], n_queries=100)
    task = retrieval_task(data)
    result = evaluate_mteb(minilm, [task], DIMS, ["float32", "int8"], "local/minilm", "r0",
                           mteb.ResultCache(str(tmp_path)))
    queries, docs = minilm.encode(data.queries, normalize=False), minilm.encode(data.docs, normalize=False)
    ours = evaluate_retrieval(queries, docs, data, DIMS)
    assert by_dim(result, task) == pytest.approx({d: m["ndcg@10"] for d, m in ours.items()}, abs=ROUNDED)
    for d, score in by_dim(result, task, "int8").items():
        _, index = quantized_search(queries, docs, d, "int8", k=101)
        assert score == pytest.approx(retrieval_metrics(rankings_from(index, data), data.qrels)["ndcg@10"],
                                      abs=ROUNDED), d


def test_binary_scores_are_hamming_search_scores():
    """Binary nDCG is not compared above: its scores are integers, and documents at one Hamming distance are
    ranked in any order (mteb's and mrl's tie orders differ). The scores themselves are mrl's."""
    full = torch.randn(50, 24, generator=torch.Generator().manual_seed(0))
    for d in (24, 13):
        q, c = stored(full[:10], d, "binary", is_query=True), stored(full[10:], d, "binary", is_query=False)
        bits = lambda x: (x[:, :d] > 0).int()  # noqa: E731
        hamming = (bits(full[:10])[:, None] != bits(full[10:])[None]).sum(-1)  # (10, 40)
        assert torch.equal(q @ c.T, (d - 2 * hamming).double())
        _, index = quantized_search(full[:10], full[10:], d, "binary", k=40)
        assert torch.equal((q @ c.T).gather(1, index), (q @ c.T).sort(dim=1, descending=True).values)


def test_two_dims_never_share_a_result(tiny_model_dir, sts_pairs, tmp_path):
    encoder = Encoder.from_pretrained(str(tiny_model_dir))
    task = sts_task(*[column[:40] for column in sts_pairs])
    cache = mteb.ResultCache(str(tmp_path / "cache"))
    first = evaluate_mteb(encoder, [task], [32, 4], ["float32", "binary"], "local/tiny", "r0", cache)
    scores = first["scores"][task.metadata.name]
    assert len(set(scores.values())) == 4
    saved = sorted(p.relative_to(tmp_path / "cache" / "results").parts[0]
                   for p in (tmp_path / "cache" / "results").rglob(f"{task.metadata.name}.json"))
    assert saved == ["local__tiny-d32-binary", "local__tiny-d32-float32", "local__tiny-d4-binary", "local__tiny-d4-float32"]
    # a new dim on the same cache is computed, not read: d8 after d32 and d4
    assert evaluate_mteb(encoder, [task], [8], ["float32"], "local/tiny", "r0", cache)["scores"][
        task.metadata.name]["d8/float32"] not in scores.values()
    # the trap the names avoid: one name and revision for two dims, and mteb hands the second the first's score
    full_width = FullWidth(encoder, 64)
    meta = model_meta("local/trap", "r0", 32, "float32", encoder)
    at_32 = mteb.evaluate(MatryoshkaModel(full_width, 32, "float32", meta), task, cache=cache, show_progress_bar=False)
    at_4 = mteb.evaluate(MatryoshkaModel(full_width, 4, "float32", meta), task, cache=cache, show_progress_bar=False)
    assert 100 * at_32.task_results[0].get_score() == pytest.approx(scores["d32/float32"], abs=1e-9)
    assert 100 * at_4.task_results[0].get_score() == pytest.approx(scores["d32/float32"], abs=1e-4)  # d32's, from
    assert abs(scores["d4/float32"] - scores["d32/float32"]) > 1  # the cache (rounded there), not d4's own


def test_saved_prompts_go_to_queries_and_documents(tiny_model_dir, triplets_file, tmp_path):
    prompts = {"query": "query: ", "document": "passage: "}
    Encoder.from_pretrained(str(tiny_model_dir), prompts=prompts).save(str(tmp_path / "m"))
    encoder = Encoder.from_pretrained(str(tmp_path / "m"))
    data = nli_retrieval_set([triplets_file], n_queries=50)
    task = retrieval_task(data)
    result = evaluate_mteb(encoder, [task], [32, 8], ["float32"], "local/tiny", "r0", None)
    ours = evaluate_retrieval(encoder.encode(data.queries, normalize=False, prompt_name="query"),
                              encoder.encode(data.docs, normalize=False, prompt_name="document"), data, [32, 8])
    assert by_dim(result, task) == pytest.approx({d: m["ndcg@10"] for d, m in ours.items()}, abs=ROUNDED)
    no_prompts = evaluate_retrieval(encoder.encode(data.queries, normalize=False),
                                    encoder.encode(data.docs, normalize=False), data, [32])
    assert no_prompts[32]["ndcg@10"] != ours[32]["ndcg@10"]  # the prompts change what is scored


# --- the command -------------------------------------------------------------------------------------------------


@pytest.fixture
def small_sts(sts_pairs, tmp_path):
    path = tmp_path / "sts.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence1", "sentence2", "score"])
        writer.writerows(list(zip(*sts_pairs))[:40])
    return str(path)


def test_the_command_writes_table_json_and_card(tiny_model_dir, small_sts, triplets_file, tmp_path, capsys):
    model = tmp_path / "model"
    Encoder.from_pretrained(str(tiny_model_dir)).save(str(model), matryoshka_dims=[32, 16, 8])
    (model / "README.md").write_text("# My model\n\nSome text.\n")
    argv = ["--model", str(model), "--local-sts", small_sts, "--local-nli", triplets_file, "--n-queries", "30",
            "--precision", "float32", "int8", "--out", str(tmp_path / "out"), "--card", str(model), "--no-plots"]
    main(argv)
    results = json.loads((tmp_path / "out" / "mteb.json").read_text())
    assert results["dims"] == [32, 16, 8]  # the dims saved in config.json
    assert results["name"] == "local/model" and len(results["revision"]) == 12
    assert [t.split("-")[0] for t in results["scores"]] == ["LocalSTS", "LocalNLIRetrieval"]
    assert all(len(scores) == 6 for scores in results["scores"].values())
    table = (tmp_path / "out" / "mteb.md").read_text()
    assert "| task | d32 float32 | d32 int8 | d16 float32 |" in table
    main(argv)  # a second run reads mteb's cache, and the card's section is replaced, not added twice
    again = json.loads((tmp_path / "out" / "mteb.json").read_text())["scores"]
    assert {t: pytest.approx(s, abs=1e-3) for t, s in results["scores"].items()} == again  # (stored rounded)
    assert json.loads((tmp_path / "out" / "mteb.json").read_text())["seconds"] == pytest.approx(results["seconds"],
                                                                                              abs=0.2)  # as run
    card = (model / "README.md").read_text()
    assert card.startswith("# My model\n\nSome text.\n") and card.count("## MTEB") == 1
    assert "| LocalSTS-" in card


def test_a_hub_id_through_the_mirror_is_named_by_its_id(tiny_model_dir, small_sts, tmp_path):
    mirror = tmp_path / "mirror.yaml"
    mirror.write_text(f"models:\n  someone/tiny-model: {tiny_model_dir}\n")
    main(["--model", "someone/tiny-model", "--mirror", str(mirror), "--local-sts", small_sts, "--dims", "8",
          "--out", str(tmp_path / "out"), "--no-plots"])
    results = json.loads((tmp_path / "out" / "mteb.json").read_text())
    assert results["name"] == "someone/tiny-model"
    assert list((tmp_path / "out" / "mteb-cache" / "results").iterdir())[0].name == "someone__tiny-model-d8-float32"


@pytest.mark.parametrize("change, message", [
    ({"--tasks": ["NoSuchTask"]}, "--tasks: 'NoSuchTask' not found"),
    ({"--benchmark": "MTEB(eng, v9)"}, r"--benchmark: 'MTEB\(eng, v9\)' not found. Did you mean: MTEB\(eng, v2\)"),
    ({"--dims": ["64"]}, r"--dims: \[64\] outside 1..32"),
    ({"--model": "NOT_A_MODEL"}, "--model: .* is a folder without config.json or modules.json, not a model"),
    ({"--model": "missing/folder/here"}, "--model: no model folder at"),
])
def test_bad_input_is_named_before_any_compute(tiny_model_dir, small_sts, tmp_path, monkeypatch, change, message):
    (tmp_path / "NOT_A_MODEL").mkdir()
    monkeypatch.setattr(Encoder, "encode", lambda *a, **k: pytest.fail("encoded before the input was checked"))
    args = {"--model": str(tiny_model_dir), "--local-sts": small_sts, "--out": str(tmp_path / "out")}
    args.update({k: str(tmp_path / v) if k == "--model" else v for k, v in change.items()})
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        main([x for k, v in args.items() for x in [k, *(v if isinstance(v, list) else [v])]])


def test_errors_print_one_line(tiny_model_dir, tmp_path):
    for extra, expected in ((["--tasks", "STSBenchmarkk"], "ValueError: --tasks: 'STSBenchmarkk' not found"),
                            (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'")):
        run = subprocess.run([sys.executable, "-m", "mrl.mteb", "--model", str(tiny_model_dir), "--out",
                              str(tmp_path), *extra], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert run.returncode != 0 and expected in run.stderr, run.stderr
        assert "Traceback" not in run.stderr


def test_mteb_is_an_optional_extra():
    text = (REPO / "pyproject.toml").read_text()
    assert 'mteb = ["mteb>=2.26,<3"]' in text
    assert "mteb" not in text.split("[project.optional-dependencies]")[0]
