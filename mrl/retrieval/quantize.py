"""Quantised storage of prefixes: int8 codes with per-dim scales, and binary signs (Hamming search, with
optional float re-scoring), each at any dim.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mrl.retrieval.exact import prefix, rerank, top_k


def int8_scales(corpus: Tensor) -> Tensor:
    """Per-dim scale s_c = max_i |x_ic| / 127, calibrated on the corpus (symmetric ranges)."""
    return corpus.abs().amax(0).clamp_min(1e-12) / 127


def quantize_int8(x: Tensor, scales: Tensor) -> Tensor:
    """x ≈ codes · scales, codes int8 in [-127, 127]: d bytes per vector (the scales are shared)."""
    return (x / scales).round().clamp(-127, 127).to(torch.int8)


def quantize_int8_queries(queries: Tensor, scales: Tensor) -> Tensor:
    """Query codes for int8 × int8 search against corpus codes X (x ≈ X·scales): q·x ≈ Σ_c (q_c·s_c)·X_c, so
    q·scales is quantised with a symmetric range of its own per query. That range multiplies all of a
    query's scores by one positive factor, so codes_q · Xᵀ ranks the corpus as q·x does, up to rounding."""
    weighted = queries * scales
    return (weighted / weighted.abs().amax(1, keepdim=True).clamp_min(1e-12) * 127).round().to(torch.int8)


def quantize_binary(x: Tensor) -> Tensor:
    """The sign of each dim, packed 8 per byte: ceil(d/8) bytes per vector. Bit 1 means x > 0."""
    bits = (x > 0).to(torch.uint8)
    bits = F.pad(bits, (0, (-bits.shape[1]) % 8))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=x.device)
    return (bits.view(len(x), -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_signs(packed: Tensor, d: int) -> Tensor:
    """Packed bits -> (n, d) ±1 float vectors; ±1 · ±1ᵀ = d − 2·Hamming distance."""
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :d].float() * 2 - 1


def storage_bytes(kind: str, d: int) -> int:
    return {"float32": 4 * d, "int8": d, "binary": math.ceil(d / 8)}[kind]


def quantized_search(queries: Tensor, corpus: Tensor, d: int, kind: str, k: int = 100, rescore: int = 0
                     ) -> tuple[Tensor, Tensor]:
    """Search the first d dims of a corpus stored as float32, int8 or binary codes.

    float32: exact cosine. int8: float queries against dequantised codes (asymmetric scoring). binary:
    Hamming similarity of the signs; with rescore=r, the best r·k by Hamming are re-scored with the float
    query against the float corpus vectors (kept off the search path, e.g. on disk) and the best k kept.
    """
    q, c = prefix(queries, d), prefix(corpus, d)
    if kind == "float32":
        return top_k(q, c, k)
    if kind == "int8":
        scales = int8_scales(c)
        return top_k(q, quantize_int8(c, scales).float() * scales, k)
    if kind == "binary":
        scores, index = top_k(unpack_signs(quantize_binary(q), d), unpack_signs(quantize_binary(c), d),
                              max(k, rescore * k))
        return rerank(q, c, index, k) if rescore else (scores[:, :k], index[:, :k])
    raise ValueError(f"kind: expected float32, int8 or binary, got {kind!r}")
