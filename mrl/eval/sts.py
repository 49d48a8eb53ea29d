"""Per-dimension STS evaluation: every dim scored from ONE encoding pass, truncated the way the loss truncates."""

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor


def sts_spearman_by_dim(a: Tensor, b: Tensor, gold: Tensor | list[float], dims: list[int]) -> dict[int, float]:
    """Spearman ×100 between gold scores and cos(normalize(a[:, :d]), normalize(b[:, :d])), for each d.

    a, b: (N, D) embeddings of the first and second sentence of each pair; gold: (N,) scores.
    """
    gold = torch.as_tensor(gold, dtype=torch.float64)
    scores = {}
    for d in sorted(dims, reverse=True):
        cos = (F.normalize(a[:, :d].double(), dim=-1) * F.normalize(b[:, :d].double(), dim=-1)).sum(-1)  # (N,)
        scores[d] = 100 * float(spearmanr(cos.numpy(), gold.numpy()).statistic)
    return scores


def evaluate_sts(encoder, table, dims: list[int], batch_size: int = 128, show_progress: bool = False,
                 n_layers: int | None = None, layer_norm: bool = False, prompt: str | None = None) -> dict[int, float]:
    """STS evaluation of `encoder` on a table of (sentence1, sentence2, label) at every dim in `dims`.

    Each distinct sentence is encoded once at full width; every dim is then a slice of those vectors.
    n_layers=k scores the embeddings of the backbone's first k layers (2D Matryoshka); prompt: a name of the
    model's prompts, or a text, prepended to every sentence.
    """
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
    return sts_spearman_by_dim(a, b, list(table[LABEL]), dims)
