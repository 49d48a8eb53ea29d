"""Hard-negative mining (mrl.data.mine) against brute force on a small corpus, and the command end to end: its
output trains as it is."""

import json

import pytest
import torch
import torch.nn.functional as F

from mrl.data.mine import main, mine
from mrl.retrieval.ivf import IVFIndex

from conftest import SHARED


def brute_force(anchors, positives, corpus, a, c, pos, k, lo, hi, absolute, relative, max_score):
    """The rules applied to the whole corpus at once: rank every text by score; keep the window of ranks lo..hi-1;
    filter that window by the margins and by what is not a negative (the anchor, its positive, a text seen
    before in the window); take the first k."""
    out = []
    for i in range(len(anchors)):
        scores = (a[i] @ c.T).tolist()
        window = sorted(range(len(corpus)), key=lambda j: -scores[j])[lo:hi]
        allowed = [j for j in window if corpus[j] not in (anchors[i], positives[i])
                   and (absolute is None or scores[j] <= float(pos[i]) - absolute)
                   and (relative is None or scores[j] <= float(pos[i]) * (1 - relative))
                   and (max_score is None or scores[j] <= max_score)]
        texts = list(dict.fromkeys(corpus[j] for j in allowed))  # a repeated text counts once
        out.append(texts[:k])
    return out


def mining_case(seed=0, n=20, m=60, d=16):
    g = torch.Generator().manual_seed(seed)
    corpus = [f"doc {j}" for j in range(m)]
    c = F.normalize(torch.randn(m, d, generator=g), dim=-1)
    positives = [corpus[j] for j in range(n)]  # anchor i's positive is doc i, near it
    a = F.normalize(c[:n] + 0.6 * torch.randn(n, d, generator=g), dim=-1)
    anchors = [f"query {i}" for i in range(n)]
    return anchors, positives, corpus, a, c, (a * c[:n]).sum(-1)


@pytest.mark.parametrize("k, lo, hi, absolute, relative, max_score", [
    (1, 0, 10, None, None, None), (3, 2, 30, None, 0.05, None), (2, 0, 60, 0.1, None, 0.5), (4, 5, 20, None, None, None)])
def test_mining_equals_brute_force(k, lo, hi, absolute, relative, max_score):
    anchors, positives, corpus, a, c, pos = mining_case()
    got = mine(anchors, positives, corpus, a, c, pos, k, lo, hi, absolute, relative, max_score)
    assert got == brute_force(anchors, positives, corpus, a, c, pos, k, lo, hi, absolute, relative, max_score)
    assert all(positives[i] not in found for i, found in enumerate(got))  # never the positive itself
    assert any(len(found) == k for found in got)


def test_an_ivf_index_probing_every_list_mines_what_exact_search_mines():
    anchors, positives, corpus, a, c, pos = mining_case(1)
    exact = mine(anchors, positives, corpus, a, c, pos, 3, 0, 20, None, 0.05)
    index = IVFIndex(c, 4)
    assert mine(anchors, positives, corpus, a, c, pos, 3, 0, 20, None, 0.05, index=index, n_probe=index.n_lists) == exact


def test_the_command_writes_a_dataset_that_trains_as_it_is(tmp_path, tiny_model_dir):
    path = SHARED / "data" / "nli" / "triplets.jsonl.gz"
    if not path.is_file():
        pytest.skip("no NLI triplets in ../shared")
    spec = f"{{path: json, data_files: {{train: {path}}}, split: 'train[:60]', columns: [anchor, positive]}}"
    out = tmp_path / "mined.jsonl"
    main(["--model", str(tiny_model_dir), "--data", spec, "--negatives", "2", "--range-min", "1",
          "--range-max", "20", "--absolute-margin", "0.0", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(rows) <= 60 and all(set(r) == {"anchor", "positive", "negative_1", "negative_2"} for r in rows)
    assert all(r["negative_1"] != r["positive"] and r["negative_2"] != r["negative_1"] for r in rows)
    from test_train import train_py

    proc = train_py(f"model.name={tiny_model_dir}", f"data.train={{path: json, data_files: {{train: {out}}}, split: train}}",
                    "loss.dims=[32,16]", "train.max_steps=2", "train.batch_size=8", "eval.dev=null", "eval.test=null",
                    "train.mixed_precision=no", f"output_dir={tmp_path}/run", config="configs/nli-matryoshka.yaml")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "text columns ['anchor', 'positive', 'negative_1', 'negative_2']" in proc.stdout
