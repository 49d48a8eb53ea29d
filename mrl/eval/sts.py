"""Per-dimension STS evaluation: every dim scored from ONE encoding pass, truncated the way the loss truncates, at
float32 or as stored in int8 / int4 / binary codes (mrl.retrieval.quantize.stored), with or without rescoring."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor

from mrl.retrieval.quantize import stored


def sts_spearman_by_dim(a: Tensor, b: Tensor, gold: Tensor | list[float], dims: list[int], precision: str = "float32",
                        rescore: bool = False) -> dict[int, float]:
    """Spearman ×100 between gold scores and cos(normalize(a[:, :d]), normalize(b[:, :d])), for each d.

    a, b: (N, D) embeddings of the first and second sentence of each pair; gold: (N,) scores. precision: how
    both sentences are stored, the cosine then of the stored rows: int8 / int4 codes × per-dim scales calibrated
    on the rows of a and b together, or binary signs (cos = 1 − 2·Hamming/d). rescore: the first sentence kept
    in float, scored against the second as stored (a float query re-scoring stored documents).
    """
    gold = torch.as_tensor(gold, dtype=torch.float64)
    scores = {}
    for d in sorted(dims, reverse=True):
        if precision == "float32":
            x, y = F.normalize(a[:, :d].double(), dim=-1), F.normalize(b[:, :d].double(), dim=-1)
        else:
            both = F.normalize(stored(torch.cat([a, b]), d, precision).double(), dim=-1)  # (2N, d)
            x, y = both[:len(a)], both[len(a):]
            if rescore:
                x = F.normalize(a[:, :d].double(), dim=-1)
        cos = (x * y).sum(-1)  # (N,)
        if precision != "float32":  # codes tie often (binary cosines are multiples of 2/d): ties in exact arithmetic
            cos = cos.round(decimals=12)  # are ties in the ranks, whatever the rounding of each sum
        scores[d] = 100 * float(spearmanr(cos.numpy(), gold.numpy()).statistic)
    return scores


def evaluate_sts(encoder, table, dims: list[int], batch_size: int = 128, show_progress: bool = False,
                 n_layers: int | None = None, layer_norm: bool = False, prompt: str | None = None) -> dict[int, float]:
    """STS evaluation of `encoder` on a table of (sentence1, sentence2, label) at every dim in `dims`.

    Each distinct sentence is encoded once at full width; every dim is then a slice of those vectors.
    n_layers=k scores the embeddings of the backbone's first k layers (2D Matryoshka); prompt: a name of the
    model's prompts, or a text, prepended to every sentence.
    """
    return evaluate_sts_stored(encoder, table, dims, ["float32"], batch_size, show_progress, n_layers, layer_norm,
                               prompt)["float32"]


def evaluate_sts_stored(encoder, table, dims: list[int], precisions: Sequence[str], batch_size: int = 128,
                        show_progress: bool = False, n_layers: int | None = None, layer_norm: bool = False,
                        prompt: str | None = None, rescore: bool = False) -> dict[str, dict[int, float]]:
    """evaluate_sts at each of `precisions` (float32 | int8 | int4 | binary: sts_spearman_by_dim), from one encoding
    pass: {precision: {dim: Spearman ×100}}; with rescore, also {"<precision>, rescored": ...} for each quantised
    one (the first sentence in float)."""
    from mrl.data.tables import LABEL, text_columns  # the table layout of mrl.data

    first, second = text_columns(table)[:2]
    s1, s2 = list(table[first]), list(table[second])
    unique = list(dict.fromkeys(s1 + s2))
    index = {s: i for i, s in enumerate(unique)}
    named = prompt in getattr(encoder, "prompts", {})
    embeddings = encoder.encode(unique, batch_size=batch_size, normalize=False, show_progress=show_progress,
                                n_layers=n_layers, layer_norm=layer_norm, prompt=None if named else prompt,
                                prompt_name=prompt if named else None)
    a = embeddings[[index[s] for s in s1]]  # (N, D)
    b = embeddings[[index[s] for s in s2]]  # (N, D)
    gold, scores = list(table[LABEL]), {}
    for precision in precisions:
        scores[precision] = sts_spearman_by_dim(a, b, gold, dims, precision)
        if rescore and precision != "float32":
            scores[f"{precision}, rescored"] = sts_spearman_by_dim(a, b, gold, dims, precision, rescore=True)
    return scores
