"""GradCache (Gao et al., 2021): a contrastive batch far larger than activation memory allows, exactly.

The loss of a contrastive batch couples all its rows, but its gradient w.r.t. the parameters factors through
the embeddings: ∂L/∂θ = Σ_i (∂L/∂e_i) · (∂e_i/∂θ). So one optimiser step runs in three phases:
  1. embed the batch chunk by chunk WITHOUT a graph, keeping each chunk's RNG state;
  2. compute the loss (the whole Matryoshka sum, cross-device gather included) on the cached embeddings E,
     and its gradient G = ∂L/∂E — a graph over embeddings only, a few MB;
  3. re-embed each chunk WITH a graph, RNG restored so dropout draws the same masks, and back-propagate G's
     rows of that chunk: e_chunk.backward(G_chunk). Parameter gradients accumulate to exactly ∂L/∂θ.
Peak activation memory is that of one chunk, whatever the batch size; the price is a second forward.
Because phase 2 runs the full loss once, dim sampling (loss.dim_sampling) draws one subset of dims for the whole
batch.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch
from torch import Tensor

from mrl.data.batches import chunk_features
from mrl.loss.matryoshka import LossParts


class RngState:
    """The CPU and (if used) CUDA random state at one moment, to replay dropout masks exactly."""

    def __init__(self, device: torch.device):
        if device.type not in ("cpu", "cuda"):
            raise NotImplementedError(f"GradCache replays dropout on cpu and cuda only, not {device.type}")
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self):
        """Run the block from this state; the global RNG is left as it was before the block."""
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def cached_backward(embed, features: dict[str, Tensor], n_columns: int, loss_fn, chunk_size: int, backward,
                    no_sync=None) -> LossParts:
    """One GradCache step: gradients of loss_fn on embed(features) accumulate in the parameters.

    embed: features -> embeddings, e.g. the (DDP-wrapped) encoder, (n, ...) out for n rows in; features: a tokenised, column-major batch (n_columns · B rows, as mrl.data.Collator makes it);
    loss_fn(embeddings: list of n_columns (B, D) tensors) -> LossParts (mrl.loss.matryoshka), e.g. an Objective
    with its labels bound; backward(loss): loss.backward or accelerator.backward (which scales for gradient
    accumulation and fp16); no_sync(): DDP's no_sync context, used for every chunk but the last so that
    gradients are all-reduced once per step. Returns loss_fn's LossParts, the total detached.
    """
    n_rows = len(features["input_ids"])
    chunks = [slice(start, min(start + chunk_size, n_rows)) for start in range(0, n_rows, chunk_size)]
    device = features["input_ids"].device

    states, pieces = [], []  # phase 1: embed without a graph
    with torch.no_grad():
        for rows in chunks:
            states.append(RngState(device))
            pieces.append(embed(chunk_features(features, rows)))
    cached = torch.cat(pieces).detach().requires_grad_()  # (n_columns · B, ...)

    parts = loss_fn(list(cached.chunk(n_columns)))  # phase 2: the loss and ∂L/∂E
    backward(parts.total)
    grad = cached.grad

    for i, (rows, state) in enumerate(zip(chunks, states)):  # phase 3: re-embed with a graph, push ∂L/∂E back
        sync_context = no_sync() if no_sync is not None and i < len(chunks) - 1 else nullcontext()
        with sync_context, state.replay():
            embeddings = embed(chunk_features(features, rows))
            torch.autograd.backward(embeddings, grad_tensors=grad[rows].to(embeddings.dtype))
    return replace(parts, total=parts.total.detach())
