"""Cross-device negatives: gather every process's embeddings, keeping the gradient path.

Why the gradient comes out exact. With N processes, process r holds rows E_r and computes a loss L_r on its
own anchors against the gathered candidates G = [E_1; ...; E_N]. The single-process loss on the whole global
batch is the mean over anchors, L = (1/N) Σ_r L_r (equal batch sizes; see below for unequal ones).
- The backward of a differentiable all_gather SUMS, into E_r, the gradients that every process's L_s sends to
  its rows: grad(E_r) = Σ_s ∂L_s/∂E_r = ∂(Σ_s L_s)/∂E_r.
- DDP then AVERAGES the parameter gradients over the N processes.
Together: (1/N) Σ_r ∂(Σ_s L_s)/∂θ through E_r = ∂L/∂θ — the gradient of the single-process loss, with no
extra factor. (Scaling each L_r by N, or not summing in the gather backward, would be off by N.)

Unequal batch sizes (a short last batch on one process): each L_r is then a mean over its own b_r anchors,
and the same argument gives the gradient of (1/N) Σ_r L_r, a per-process average of per-anchor means.
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate `x` (n_r, ...) of every process along dim 0, differentiably.

    Returns (gathered, offset): gathered is (Σ_r n_r, ...) in rank order, and this process's rows are
    gathered[offset : offset + n_r]. Processes may hold different numbers of rows. With one process, (x, 0).
    """
    if world_size() == 1:
        return x, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    sizes = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros(max(sizes) - len(x), *x.shape[1:])]) if len(x) < max(sizes) else x
    pieces = dist_fn.all_gather(padded)  # differentiable: its backward sums every process's gradient into x
    gathered = torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])
    return gathered, sum(sizes[: dist.get_rank()])


def gather_columns(embeddings: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Every process's rows of each text column (one collective for all columns), and the indices of this
    process's own rows in them: the `rows` argument of mrl.loss.base.contrastive_loss."""
    stacked, offset = gather_with_grad(torch.stack(embeddings, dim=1))  # (Σ_r b_r, k, D)
    rows = torch.arange(offset, offset + len(embeddings[0]), device=stacked.device)
    return list(stacked.unbind(1)), rows
