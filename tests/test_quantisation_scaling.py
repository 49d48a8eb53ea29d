"""Quantisation-aware Matryoshka composes with GradCache and cross-device negatives: the loss and every parameter
gradient equal the uncached, one-process step on the same batch, in float64 (as tests/test_gradcache.py and
tests/test_dist.py prove it for the plain loss), with every precision and each regulariser on."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mrl.loss.objective import Objective
from mrl.run.config import load_config
from mrl.run.gradcache import cached_backward
from test_dist import WORLD, load
from test_gradcache import ANCHORS, NEGATIVES, POSITIVES, assert_same_step, batch, cached_step, encoder, uncached_step


def objective(regulariser: str, n_processes: int = 1) -> Objective:
    """The contrastive loss in Matryoshka 32/16/8 with int8, int4 and binary terms and `regulariser`; the ranges
    calibrated on fixed rows (about a fifth of the tiny model's coordinates fall outside them: clamped)."""
    config = load_config(None, ["loss.name=contrastive", "loss.dims=[32,16,8]", "loss.quantisation.int8=0.5",
                                "loss.quantisation.int4=1.0", "loss.quantisation.binary=0.7",
                                f"loss.quantisation.regulariser={regulariser}",
                                "loss.quantisation.regulariser_weight=2.0"]).loss
    result = Objective(config, width=32, n_processes=n_processes)
    rows = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result.quantised.calibrate(0.5 * F.normalize(rows, dim=-1))
    return result


@pytest.mark.parametrize("regulariser, chunk_size", [("spread_out", 5), ("orthogonality", 24), ("spread_out", 1)])
def test_cached_step_equals_uncached_step(tiny_model_dir, regulariser, chunk_size):
    model = encoder(tiny_model_dir, dropout=False)
    features = batch(model)
    loss_fn = objective(regulariser)
    cached = cached_step(model, features, loss_fn, chunk_size)
    uncached = uncached_step(model, features, loss_fn)
    assert_same_step(cached, uncached)
    parts = loss_fn(list(model(features).chunk(3)))  # the terms are there, and finite
    assert {"int8_d8", "int4_d16", "binary_d32", f"{regulariser}_d8"} <= set(parts.terms)


def worker(rank, model_dir, init_file, out_dir, regulariser, chunk_size):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = load(model_dir)
        ddp = DistributedDataParallel(model)
        per_rank = len(ANCHORS) // WORLD
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        features = dict(model.tokenize([t for column in (ANCHORS, POSITIVES, NEGATIVES) for t in column[rows]]))
        loss_fn = objective(regulariser, n_processes=WORLD)
        assert loss_fn.cross_device  # every process's candidates, and the regulariser over every process's rows
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


@pytest.mark.parametrize("regulariser, chunk_size", [("spread_out", None), ("orthogonality", 3)])
def test_two_processes_equal_one_process(tmp_path, tiny_model_dir, regulariser, chunk_size):
    mp.spawn(worker, args=(str(tiny_model_dir), str(tmp_path / "init"), str(tmp_path), regulariser, chunk_size),
             nprocs=WORLD, join=True)
    model = load(str(tiny_model_dir))
    loss_fn = objective(regulariser)
    assert not loss_fn.cross_device
    loss = loss_fn(list(model(dict(model.tokenize(ANCHORS + POSITIVES + NEGATIVES))).chunk(3))).total
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
        assert result["grads"].keys() == grads.keys() and len(grads) > 10
        for name, grad in grads.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name)
