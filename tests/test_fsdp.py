"""Fully sharded data parallel (torch's FSDP2, `fully_shard`: what Accelerate's FSDP2 plugin applies) on 2 CPU
processes (gloo) equals 1 process on the same global batch: the loss and every parameter's gradient, in
float64, for the Matryoshka contrastive loss with cross-device negatives, plain and through GradCache, on an
encoder and on a decoder. Each process holds half of every parameter; its gradient shard is compared with the
same slice of the single-process gradient. The save (mrl.model.sharding.full_model) gathers the full trained weights."""

import os
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mrl import Encoder
from mrl.loss.dist import gather_columns
from mrl.run.gradcache import cached_backward
from mrl.loss.base import contrastive_loss
from mrl.loss.matryoshka import MatryoshkaLoss
from mrl.loss.nested import contrastive_losses_nested
from test_gradcache import ANCHORS, NEGATIVES, POSITIVES

WORLD = 2


def matryoshka():
    return MatryoshkaLoss(partial(contrastive_loss, scale=20.0), [32, 16, 8], [1.0, 0.5, 2.0],
                          nested_loss=partial(contrastive_losses_nested, scale=20.0))


def load(model_dir, pooling):
    torch.manual_seed(0)
    model = Encoder.from_pretrained(model_dir, pooling=pooling, append_eos=pooling == "lasttoken").double().eval()
    # right padding: a text keeps its positions in any batch. (Left padding shifts them by the batch's longest
    # text; RoPE is shift-invariant, but computed in float32, so to 1e-8 only: not what this test measures.)
    model.tokenizer.padding_side = "right"
    return model


def layers(model):
    """The backbone's transformer blocks: each its own FSDP unit, as Accelerate's transformer wrap policy does."""
    return [m for name, m in model.backbone.named_modules() if name.rsplit(".", 1)[-1].isdigit()
            and name.rsplit(".", 1)[0].endswith(("layer", "layers"))]


def worker(rank, model_dir, pooling, init_file, out_dir, chunk_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = load(model_dir, pooling)
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in layers(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        per_rank = len(ANCHORS) // WORLD
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        features = dict(model.tokenize([t for column in (ANCHORS, POSITIVES, NEGATIVES) for t in column[rows]]))
        loss_fn = matryoshka()

        def gathered_loss(embeddings):  # cross-device negatives: each anchor against every process's candidates
            all_columns, own_rows = gather_columns(embeddings)
            return loss_fn(all_columns, dims=loss_fn.dims, rows=own_rows)

        if chunk_size:
            def no_sync():  # FSDP2's no_sync: gradients reduce-scattered once, after the last chunk's backward
                model.set_requires_gradient_sync(False)
                return _Restore(model)

            loss = cached_backward(model, features, 3, gathered_loss, chunk_size, backward=lambda l: l.backward(),
                                   no_sync=no_sync).total
        else:
            loss = gathered_loss(list(model(features).chunk(3))).total
            loss.backward()
        # FSDP2 reduce-scatters the gradient as the average over processes, as DDP all-reduces it
        total = loss.detach().clone()
        dist.all_reduce(total)
        shards = {name: (p.grad.to_local().clone(), p.grad.placements[0].dim, p.shape)
                  for name, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": total / WORLD, "shards": shards}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class _Restore:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)


def single_process(model_dir, pooling):
    model = load(model_dir, pooling)
    features = dict(model.tokenize(ANCHORS + POSITIVES + NEGATIVES))
    loss_fn = matryoshka()
    loss = loss_fn(list(model(features).chunk(3)), dims=loss_fn.dims).total
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind, chunk_size", [("encoder", None), ("encoder", 5), ("decoder", 5)])
def test_fully_sharded_two_processes_equal_one_process(tmp_path, tiny_model_dir, tiny_decoder_dir, kind, chunk_size):
    model_dir, pooling = (str(tiny_model_dir), "mean") if kind == "encoder" else (str(tiny_decoder_dir), "lasttoken")
    mp.spawn(worker, args=(model_dir, pooling, str(tmp_path / "init"), str(tmp_path), chunk_size), nprocs=WORLD,
             join=True)
    loss, grads = single_process(model_dir, pooling)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        torch.testing.assert_close(result["loss"], loss, rtol=1e-10, atol=1e-12)
        assert result["shards"].keys() == grads.keys() and len(grads) > 10
        for name, (shard, dim, shape) in result["shards"].items():
            assert tuple(shape) == tuple(grads[name].shape)
            expected = grads[name].tensor_split(WORLD, dim=dim)[rank]  # this process's slice of the whole gradient
            torch.testing.assert_close(shard[:expected.shape[dim]] if dim == 0 else shard, expected,
                                       rtol=1e-9, atol=1e-12, msg=name)


class _FsdpAccelerator:
    """What mrl.model.sharding.full_model reads of an Accelerator under FSDP2; the gather is Accelerate's own code
    (Accelerator.get_state_dict), which Accelerate runs under FSDP on GPUs only."""

    def __init__(self, rank):
        from accelerate.utils import DistributedType

        self.distributed_type, self.is_fsdp2, self.is_main_process = DistributedType.FSDP, True, rank == 0

    def get_state_dict(self, model):
        from accelerate import Accelerator

        return Accelerator.get_state_dict(self, model)


def one_sgd_step(model):
    """The whole batch on every process: FSDP2's averaged gradient is then the single process's."""
    features = dict(model.tokenize(ANCHORS + POSITIVES + NEGATIVES))
    loss_fn = matryoshka()
    loss = loss_fn(list(model(features).chunk(3)), dims=loss_fn.dims).total
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return features


def save_worker(rank, model_dir, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mrl.model.sharding import full_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = load(model_dir, "mean")
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in layers(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        features = one_sgd_step(model)
        saved = full_model(_FsdpAccelerator(rank), model, rebuild=lambda: load(model_dir, "mean"))
        if rank == 0:
            with torch.no_grad():
                torch.save({"state": saved.state_dict(), "embeddings": saved(features)},
                           os.path.join(out_dir, "saved.pt"))
        else:
            assert saved is None
    finally:
        dist.destroy_process_group()


def test_the_model_saved_under_fsdp_is_the_whole_trained_model(tmp_path, tiny_model_dir):
    """train.py's save under FSDP (mrl.model.sharding.full_model, through Accelerate's gather): after a step on 2 fully
    sharded processes, the main process gets every full weight of the model 1 process trains, and its vectors."""
    mp.spawn(save_worker, args=(str(tiny_model_dir), str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)
    model = load(str(tiny_model_dir), "mean")
    start = {name: p.detach().clone() for name, p in model.state_dict().items()}
    features = one_sgd_step(model)
    state = model.state_dict()
    assert saved["state"].keys() == state.keys()
    for name, value in state.items():
        torch.testing.assert_close(saved["state"][name], value, rtol=1e-10, atol=1e-12, msg=name)
    assert max((state[n] - start[n]).abs().max() for n in state if state[n].is_floating_point()) > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(saved["embeddings"], model(features), rtol=1e-10, atol=1e-12)
