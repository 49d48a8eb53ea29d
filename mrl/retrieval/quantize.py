"""Quantised storage of prefixes: int8 and int4 codes with per-dim scales, and binary signs (Hamming search),
each at any dim, with optional float re-scoring. The code formulas are those quantisation-aware training uses
(mrl.loss.quantisation: one copy); here each dim's prefix is calibrated on its own corpus.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mrl.loss.quantisation import LARGEST_CODE, code_scales, integer_codes
from mrl.retrieval.exact import prefix, rerank, top_k

PRECISIONS = ("float32", "int8", "int4", "binary")


def corpus_scales(corpus: Tensor, precision: str = "int8") -> Tensor:
    """Per-dim scale s_c = max_i |x_ic| / m, calibrated on the corpus (symmetric ranges); m = 127 for int8 (7
    with precision="int4")."""
    return code_scales(corpus.abs().amax(0), precision)


def quantize_codes(x: Tensor, scales: Tensor, precision: str = "int8") -> Tensor:
    """x ≈ codes · scales, codes int8 in [-127, 127]: d bytes per vector (the scales are shared); with
    precision="int4", codes in [-7, 7], two to a byte when stored (kept one to an int8 here)."""
    return integer_codes(x, scales, precision).to(torch.int8)


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
    return {"float32": 4 * d, "int8": d, "int4": math.ceil(d / 2), "binary": math.ceil(d / 8)}[kind]


def stored(x: Tensor, d: int, precision: str) -> Tensor:
    """The first d dims of the rows x as a store holds them, as float32 rows whose dot products are the stored
    scores: float32, the unit prefix (`prefix`); int8 / int4, its codes × per-dim scales calibrated on these rows;
    binary, its signs as ±1 (dot = d − 2·Hamming)."""
    x = prefix(x, d)  # (N, d) unit norm
    if precision == "binary":
        return unpack_signs(quantize_binary(x), d)
    if precision in LARGEST_CODE:
        scales = corpus_scales(x, precision)
        return quantize_codes(x, scales, precision).float() * scales
    if precision != "float32":
        raise ValueError(f"kind: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return x


def quantized_search(queries: Tensor, corpus: Tensor, d: int, kind: str, k: int = 100, rescore: int = 0
                     ) -> tuple[Tensor, Tensor]:
    """Search the first d dims of a corpus stored as float32, int8, int4 or binary codes (`stored`).

    float32: exact cosine. int8, int4: float queries against dequantised codes (asymmetric scoring). binary:
    Hamming similarity of the signs, the queries' too. With rescore=r (a quantised kind), the best r·k of that
    search are re-scored with the float query against the float corpus vectors (kept off the search path, e.g.
    on disk) and the best k kept.
    """
    q, c = prefix(queries, d), stored(corpus, d, kind)
    if kind == "float32":
        return top_k(q, c, k)
    scores, index = top_k(stored(queries, d, kind) if kind == "binary" else q, c, max(k, rescore * k))
    return rerank(q, prefix(corpus, d), index, k) if rescore else (scores[:, :k], index[:, :k])
