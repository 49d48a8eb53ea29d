"""mrl.eval.sts: per-dim STS Spearman, computed by hand; and mrl.eval.report.markdown_table."""

import math

import datasets
import pytest
import torch
from scipy.stats import rankdata, spearmanr

from mrl import evaluate_sts, markdown_table, sts_spearman_by_dim


def loop_cos(u, v):
    u, v = [float(x) for x in u], [float(x) for x in v]
    return sum(a * b for a, b in zip(u, v)) / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def hand_spearman(x, y):
    """Pearson correlation of the average ranks, written out."""
    rx, ry = rankdata(x), rankdata(y)
    mx, my = rx.mean(), ry.mean()
    return float(((rx - mx) * (ry - my)).sum() / math.sqrt(((rx - mx) ** 2).sum() * ((ry - my) ** 2).sum()))


def hand_scores(a, b, gold, dims):
    scores = {}
    for d in dims:
        cos = [loop_cos(a[i, :d], b[i, :d]) for i in range(len(a))]
        scores[d] = (100 * spearmanr(cos, gold).statistic, 100 * hand_spearman(cos, gold))
    return scores


@pytest.mark.parametrize("seed,N,D,dims", [(0, 20, 16, [16, 8, 2]), (1, 35, 12, [1, 12, 5]), (2, 8, 4, [4])])
def test_sts_spearman_by_dim_matches_hand_computation(seed, N, D, dims):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g)
    b = a + 0.8 * torch.randn(N, D, generator=g)  # correlated, so the scores are not all ~0
    gold = torch.randint(0, 6, (N,), generator=g).float().tolist()  # with ties
    got = sts_spearman_by_dim(a, b, gold, dims)
    assert list(got) == sorted(dims, reverse=True)
    for d, (with_scipy, by_hand) in hand_scores(a, b, gold, dims).items():
        assert got[d] == pytest.approx(with_scipy, abs=1e-9)
        assert got[d] == pytest.approx(by_hand, abs=1e-9)
        assert isinstance(got[d], float) and -100 <= got[d] <= 100


def test_sts_spearman_is_scale_invariant_and_accepts_tensor_gold():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(15, 8, generator=g), torch.randn(15, 8, generator=g)
    gold = torch.rand(15, generator=g)
    scales = torch.rand(15, 1, generator=g) + 0.1
    assert sts_spearman_by_dim(a * scales, b, gold, [8, 4]) == pytest.approx(sts_spearman_by_dim(a, b, gold, [8, 4]))
    assert sts_spearman_by_dim(a, b, gold, [8]) == pytest.approx(sts_spearman_by_dim(a, b, gold.tolist(), [8]))


def test_sts_spearman_perfect_and_reversed():
    a = torch.randn(10, 6, generator=torch.Generator().manual_seed(4))
    b = torch.randn(10, 6, generator=torch.Generator().manual_seed(5))
    cos = [loop_cos(a[i], b[i]) for i in range(10)]
    assert sts_spearman_by_dim(a, b, cos, [6])[6] == pytest.approx(100.0)
    assert sts_spearman_by_dim(a, b, [-c for c in cos], [6])[6] == pytest.approx(-100.0)


SENTENCES = ["A man plays a guitar.", "A woman is slicing an onion.", "Dogs run in the snow.",
             "A plane takes off.", "Kids play football.", "The market fell sharply today."]
PAIRS = [(0, 1, 1.0), (0, 2, 0.2), (3, 4, 0.6), (5, 1, 0.0), (2, 4, 0.9), (1, 3, 0.4), (4, 5, 0.7), (2, 2, 1.0),
         (5, 0, 0.3)]


def embed_alone(encoder, text):
    """Independent of encode: the backbone on this text alone, mean of its tokens, as the model outputs it."""
    features = encoder.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        x = encoder.backbone(**features).last_hidden_state[0].mean(0)
    return x / x.norm() if encoder.normalize else x


def test_evaluate_sts_matches_hand_computation(tiny_encoder):
    table = datasets.Dataset.from_dict({
        "sentence1": [SENTENCES[i] for i, _, _ in PAIRS],
        "sentence2": [SENTENCES[j] for _, j, _ in PAIRS],
        "label": [y for _, _, y in PAIRS],
    })
    dims = [4, 32, 16]
    got = evaluate_sts(tiny_encoder, table, dims, batch_size=4)
    assert list(got) == [32, 16, 4]
    vectors = {s: embed_alone(tiny_encoder, s) for s in SENTENCES}
    gold = [y for _, _, y in PAIRS]
    for d in dims:
        cos = [loop_cos(vectors[SENTENCES[i]][:d], vectors[SENTENCES[j]][:d]) for i, j, _ in PAIRS]
        assert got[d] == pytest.approx(100 * spearmanr(cos, gold).statistic, abs=1e-4)
        assert got[d] == pytest.approx(100 * hand_spearman(cos, gold), abs=1e-4)


def test_evaluate_sts_uses_the_first_two_text_columns(tiny_encoder):
    rows = {"s1": [SENTENCES[i] for i, _, _ in PAIRS], "s2": [SENTENCES[j] for _, j, _ in PAIRS],
            "label": [y for _, _, y in PAIRS]}
    renamed = datasets.Dataset.from_dict(rows)
    canonical = datasets.Dataset.from_dict({"sentence1": rows["s1"], "sentence2": rows["s2"], "label": rows["label"]})
    assert evaluate_sts(tiny_encoder, renamed, [8]) == pytest.approx(evaluate_sts(tiny_encoder, canonical, [8]))


def test_markdown_table_format():
    results = {"baseline": {64: 80.123, 8: 70.0}, "matryoshka": {64: 81.0, 32: 79.456, 8: 75.555}}
    expected = "\n".join([
        "| Spearman ×100 | d=64 | d=32 | d=8 |",
        "| --- | ---: | ---: | ---: |",
        "| baseline | 80.12 |  | 70.00 |",
        f"| matryoshka | 81.00 | 79.46 | {75.555:.2f} |",
    ])
    assert markdown_table(results) == expected


def test_markdown_table_metric_name_and_single_row():
    table = markdown_table({"run": {16: 1.0}}, metric="nDCG@10")
    assert table.splitlines() == ["| nDCG@10 | d=16 |", "| --- | ---: |", "| run | 1.00 |"]
    lines = markdown_table({"a": {2: 0.5}, "b": {1: -3.333}}).splitlines()
    assert len(lines) == 4 and all(line.count("|") == 4 for line in lines)
    assert lines[3] == "| b |  | -3.33 |"
