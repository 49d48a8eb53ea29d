"""Quantisation-aware Matryoshka composes with GradCache and cross-device negatives: the loss and every parameter
gradient equal the uncached, one-process step on the same batch, in float64 (as tests/test_gradcache.py and
tests/test_dist.py prove it for the plain loss), with every precision and each regulariser on."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from mrl.loss.objective import Objective
from mrl.run.config import load_config
from test_dist import WORLD, assert_equal_to_one_process, load, worker
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


@pytest.mark.parametrize("regulariser, chunk_size", [("spread_out", None), ("orthogonality", 3)])
def test_two_processes_equal_one_process(tmp_path, tiny_model_dir, regulariser, chunk_size):
    """Each process: its anchors against every process's candidates, the regulariser over every process's rows."""
    assert objective(regulariser, n_processes=WORLD).cross_device
    mp.spawn(worker, args=(str(tiny_model_dir), str(tmp_path / "init"), str(tmp_path), chunk_size, objective,
                           regulariser, WORLD), nprocs=WORLD, join=True)
    model = load(str(tiny_model_dir))
    loss_fn = objective(regulariser)
    assert not loss_fn.cross_device
    loss = loss_fn(list(model(dict(model.tokenize(ANCHORS + POSITIVES + NEGATIVES))).chunk(3))).total
    loss.backward()
    assert_equal_to_one_process(tmp_path, loss.detach(),
                                {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
