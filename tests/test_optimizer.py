"""mrl.run.optimizer: the learning-rate schedule against transformers' get_linear_schedule_with_warmup (the
function the reference trainer uses), step for step; and the parameter groups."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from mrl.run.optimizer import linear_schedule, param_groups


@pytest.mark.parametrize("warmup_ratio,max_steps,processes,grad_accum,batches", [
    (0.1, None, 1, 1, 360), (0.1, 100, 2, 1, 1000), (0.0, 7, 1, 2, 50), (0.37, None, 3, 1, 999)])
def test_the_schedule_is_transformers_linear_warmup_step_for_step(warmup_ratio, max_steps, processes, grad_accum,
                                                                  batches):
    train = SimpleNamespace(grad_accum=grad_accum, epochs=2, max_steps=max_steps, warmup_ratio=warmup_ratio)
    ours_opt, theirs_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5) for _ in range(2))
    ours, total = linear_schedule(ours_opt, train, batches, processes)
    assert total == min(2 * math.ceil(batches / (processes * grad_accum)), max_steps or math.inf)
    theirs = get_linear_schedule_with_warmup(theirs_opt, math.ceil(warmup_ratio * total) * processes,
                                             total * processes)
    for _ in range(total * processes + 3):  # past the end too: the rate stays 0
        assert ours.get_last_lr() == theirs.get_last_lr()
        for optimizer, scheduler in ((ours_opt, ours), (theirs_opt, theirs)):
            optimizer.step()
            scheduler.step()


def test_weight_decay_only_on_matrices_and_the_dim_weights_at_their_own_rate():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model[1].weight.requires_grad_(False)  # frozen: in no group
    learned = [torch.nn.Parameter(torch.zeros(5))]
    decayed, plain, loss = param_groups(model, learned, weight_decay=0.01, dim_weight_lr=1e-2)
    assert decayed["params"] == [model[0].weight] and decayed["weight_decay"] == 0.01
    assert plain["params"] == [model[0].bias, model[1].bias] and plain["weight_decay"] == 0.0
    assert loss == {"params": learned, "weight_decay": 0.0, "lr": 1e-2}
