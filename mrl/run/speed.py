"""How a training batch is computed, never what: every option here gives the embeddings (and gradients) of
the plain forward, to float rounding (tests/test_static_shapes.py). The config's `speed` section.

- Length groups: the batch embedded as a few forwards over texts of similar length, each padded only to its
  own longest text (embed_by_length). Pays where compute follows tokens (CPU).
- Padding to a multiple (speed.pad_to_multiple_of; mrl.data.Collator pads): a few batch shapes instead of one
  per length, which torch.compile and CUDA graphs need.
- Compiling the training forward (compile_forward).
docs/performance.md has what each measured.
"""

import math

import torch
from torch import Tensor, nn

from mrl.data.batches import chunk_features


def length_groups_for(n_texts: int, setting: int | None, device: torch.device) -> int:
    """speed.length_groups, or by default 1 forward per batch on a GPU (launch-bound at small batches) and, on
    a CPU, where compute follows tokens, groups of about 32 texts, at least 2 (the fastest measured for STS
    and NLI batches: docs/performance.md)."""
    if setting:
        return setting
    return 1 if device.type == "cuda" else max(2, n_texts // 32)


def embed_by_length(embed, features: dict[str, Tensor], groups: int, pad_to_multiple_of: int | None = None) -> Tensor:
    """embed(features), computed as `groups` forwards over texts of similar length, each padded only to the
    longest text of its group; rows come back in input order.

    Padding is masked, so these are the embeddings of one forward (to float rounding; dropout draws other
    masks); the batch, and so which texts are each other's negatives, is unchanged. What changes is the padded
    compute: a batch of 16 STS-B pairs is padded to its longest text, 2.4× its real tokens; sorted into 2
    groups it needs a third fewer padded tokens, into 4 groups nearly half fewer. A batch of 128 NLI triplets
    is padded to 4.8× its real tokens, in 12 groups to 1.3×. pad_to_multiple_of: each group keeps padding up
    to a multiple of this many tokens (a few shapes, for torch.compile).
    """
    if groups <= 1:
        return embed(features)
    lengths = features["attention_mask"].sum(1)
    order = lengths.argsort(descending=True, stable=True)
    pieces = [embed(chunk_features(features, rows, pad_to_multiple_of))
              for rows in order.tensor_split(groups) if len(rows)]
    return torch.cat(pieces)[order.argsort()]


def compile_forward(model: nn.Module, mode: str | None, max_length: int, pad_to_multiple_of: int | None,
                    length_groups: int) -> nn.Module:
    """The training forward: `model` itself, or torch.compile'd in `mode` (its backward then too); evaluation
    and saving use `model`, eager. One graph per batch shape: each padded length (pad_to_multiple_of keeps them
    few) in each length group, times a few batch sizes (an epoch's last batch); Dynamo's recompile limit (8 by
    default) is raised to cover them."""
    if mode is None:
        return model
    n_shapes = 4 * length_groups * math.ceil(max_length / pad_to_multiple_of)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, n_shapes)
    return torch.compile(model, mode=mode, dynamic=False)


def describe(speed, cache_chunk_size: int | None, length_groups: int) -> str:
    """How each batch is embedded, in words, for the log."""
    return ((f"GradCache chunks of {cache_chunk_size} texts" if cache_chunk_size
             else f"each batch embedded in {length_groups} length group(s)")
            + (f", padded to multiples of {speed.pad_to_multiple_of} tokens" if speed.pad_to_multiple_of else "")
            + (f", encoder compiled ({speed.compile})" if speed.compile else ""))
