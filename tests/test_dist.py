"""Cross-device negatives on 2 CPU processes (gloo) equal 1 process on the same global batch: the loss and
every parameter's gradient, in float64 — plain, and combined with GradCache. See mrl/loss/dist.py for the math."""

import os
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from mrl import Encoder
from mrl.loss.dist import gather_columns, gather_with_grad
from mrl.run.gradcache import cached_backward
from mrl.loss.base import contrastive_loss
from mrl.loss.matryoshka import MatryoshkaLoss
from mrl.loss.nested import contrastive_losses_nested
from test_gradcache import ANCHORS, NEGATIVES, POSITIVES

WORLD = 2


def matryoshka(symmetric):
    kwargs = dict(scale=20.0, symmetric=symmetric)
    return MatryoshkaLoss(partial(contrastive_loss, **kwargs), [32, 16, 8], [1.0, 0.5, 2.0],
                          nested_loss=partial(contrastive_losses_nested, **kwargs))


def load(model_dir):
    torch.manual_seed(0)
    return Encoder.from_pretrained(model_dir).double().eval()  # dropout off: both sides see the same function


def gathered_matryoshka(symmetric):
    """embeddings -> LossParts: the Matryoshka loss of this process's anchors against every process's candidates."""
    loss_fn = matryoshka(symmetric)

    def gathered_loss(embeddings):
        all_columns, own_rows = gather_columns(embeddings)
        return loss_fn(all_columns, dims=loss_fn.dims, rows=own_rows)
    return gathered_loss


def worker(rank, model_dir, init_file, out_dir, chunk_size, make_loss, *loss_args):
    """One of WORLD processes: its share of the batch (rows of every column), the loss make_loss(*loss_args) (made
    here: spawn pickles functions by name), the step plain or through GradCache; writes the global loss (the mean
    of the processes' losses) and its gradients to rank<r>.pt."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = load(model_dir)
        ddp = DistributedDataParallel(model)
        per_rank = len(ANCHORS) // WORLD
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        texts = [t for column in (ANCHORS, POSITIVES, NEGATIVES) for t in column[rows]]  # column-major
        features = dict(model.tokenize(texts))
        loss_fn = make_loss(*loss_args)
        if chunk_size:
            loss = cached_backward(ddp, features, 3, loss_fn, chunk_size, backward=lambda l: l.backward(),
                                   no_sync=ddp.no_sync).total
        else:
            loss = loss_fn(list(ddp(features).chunk(3))).total
            loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)  # the mean over processes of the local losses is the global loss
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": total / WORLD, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def assert_equal_to_one_process(out_dir, loss, grads):
    """Every process's saved global loss and gradients equal the one-process `loss` and `grads` (float64)."""
    for rank in range(WORLD):
        result = torch.load(os.path.join(out_dir, f"rank{rank}.pt"))
        torch.testing.assert_close(result["loss"], loss, rtol=1e-10, atol=1e-12)
        assert result["grads"].keys() == grads.keys() and len(grads) > 10
        for name, grad in grads.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name)


def single_process(model_dir, symmetric):
    model = load(model_dir)
    features = dict(model.tokenize(ANCHORS + POSITIVES + NEGATIVES))
    loss_fn = matryoshka(symmetric)
    loss = loss_fn(list(model(features).chunk(3)), dims=loss_fn.dims).total
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("symmetric, chunk_size", [(False, None), (True, None), (False, 3)])
def test_two_processes_equal_one_process(tmp_path, tiny_model_dir, symmetric, chunk_size):
    mp.spawn(worker, args=(str(tiny_model_dir), str(tmp_path / "init"), str(tmp_path), chunk_size,
                           gathered_matryoshka, symmetric), nprocs=WORLD, join=True)
    assert_equal_to_one_process(tmp_path, *single_process(str(tiny_model_dir), symmetric))


def gather_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x = torch.full((3 if rank == 0 else 1, 2), float(rank + 1), dtype=torch.float64, requires_grad=True)
        gathered, offset = gather_with_grad(x)
        (gathered * torch.arange(1, len(gathered) + 1, dtype=torch.float64)[:, None]).sum().backward()
        torch.save({"gathered": gathered.detach(), "offset": offset, "grad": x.grad}, os.path.join(out_dir, f"g{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_handles_unequal_sizes_and_sums_gradients(tmp_path):
    mp.spawn(gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = torch.load(tmp_path / "g0.pt"), torch.load(tmp_path / "g1.pt")
    expected = torch.tensor([[1.0, 1.0]] * 3 + [[2.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(r0["gathered"], expected)
    torch.testing.assert_close(r1["gathered"], expected)
    assert (r0["offset"], r1["offset"]) == (0, 3)
    # each process's loss weights row i by i+1; the backward sums both processes' gradients: 2·(i+1)
    torch.testing.assert_close(r0["grad"], 2 * torch.tensor([[1.0] * 2, [2.0] * 2, [3.0] * 2], dtype=torch.float64))
    torch.testing.assert_close(r1["grad"], 2 * torch.tensor([[4.0] * 2], dtype=torch.float64))
