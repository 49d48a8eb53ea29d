"""The Matryoshka loss's options beyond plain MRL: prefix self-distillation, dim schedules, dim weights.

Each is checked against an independent float64 formula written from the docstring, not from the code."""

import json
import math
import random
from functools import partial

import pytest
import torch

from mrl.run.config import load_config
from mrl.loss.base import LOSSES
from mrl.loss.matryoshka import MatryoshkaLoss
from mrl.loss.nested import NESTED_LOSSES, NESTED_SCORES
from mrl.loss.objective import Objective
from mrl.loss.variants import (DIM_WEIGHT_RULES, DimSampler, LearnedWeightsMatryoshkaLoss, PrefixDistillation,
                          dim_weights)
from test_train import encode_saved, run_train


def columns(seed, n_columns, batch=6, width=32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, width, generator=generator, dtype=torch.float64, requires_grad=True)
            for _ in range(n_columns)]


def matryoshka(name, dims, weights=None, distill_weight=0.0, distill_temperature=0.05):
    """The Matryoshka loss of `name` (fused path) with fixed, rule or learned weights, plus distillation if asked."""
    base, nested = partial(LOSSES[name], scale=20.0), partial(NESTED_LOSSES[name], scale=20.0)
    if weights == "learned":
        loss = LearnedWeightsMatryoshkaLoss(base, dims, nested)
    else:
        loss = MatryoshkaLoss(base, dims, dim_weights(weights, dims) if isinstance(weights, str) else weights, nested)
    return PrefixDistillation(loss, NESTED_SCORES[name], distill_weight, distill_temperature) if distill_weight else loss


def kl_reference(teacher_scores, student_scores, temperature):
    """KL(P_teacher ‖ P_student) per row, averaged over rows; softmax by hand; the teacher carries no gradient."""
    def softmax(x):
        e = torch.exp(x / temperature - (x / temperature).max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)
    p, q = softmax(teacher_scores.detach()), softmax(student_scores)
    return (p * (torch.log(p) - torch.log(q))).sum(-1).mean()


def unit(x, d):
    return x[:, :d] / x[:, :d].norm(dim=-1, keepdim=True)


def contrastive_distill_reference(embeddings, dims, temperature, rows):
    q, candidates = embeddings[0][rows], torch.cat(embeddings[1:])
    width = q.shape[1]
    full = unit(q, width) @ unit(candidates, width).T
    return [kl_reference(full, unit(q, d) @ unit(candidates, d).T, temperature) for d in dims if d < width]


def cosent_distill_reference(embeddings, dims, temperature):
    a, b = embeddings
    width = a.shape[1]
    pair = lambda d: (unit(a, d) * unit(b, d)).sum(-1)[None]  # noqa: E731  one row: the batch's pair cosines
    return [kl_reference(pair(width), pair(d), temperature) for d in dims if d < width]


@pytest.mark.parametrize("n_columns, rows", [(2, None), (3, None), (3, [1, 4])])
def test_contrastive_distillation_equals_the_float64_formula(n_columns, rows):
    dims, temperature, weight = [32, 16, 8, 4], 0.1, 0.7
    embeddings = columns(0, n_columns)
    loss_fn = matryoshka("contrastive", dims, distill_weight=weight, distill_temperature=temperature)
    row_index = None if rows is None else torch.tensor(rows)
    kwargs = {} if rows is None else {"rows": row_index}
    parts = loss_fn(embeddings, dims=dims, **kwargs)
    total = parts.total

    all_rows = torch.arange(6) if rows is None else row_index
    plain = sum(LOSSES["contrastive"]([unit(e, d) for e in embeddings], scale=20.0, rows=row_index) for d in dims)
    kls = contrastive_distill_reference(embeddings, dims, temperature, all_rows)
    expected = plain + weight * sum(kls)
    torch.testing.assert_close(total, expected)
    for d, kl in zip([16, 8, 4], kls):
        torch.testing.assert_close(parts.terms[f"distill_d{d}"], kl.detach())
    assert list(parts.terms) == ["distill_d16", "distill_d8", "distill_d4"]  # the full width is the teacher
    assert list(parts.per_dim) == dims  # the terms are not dims

    # gradients too: the teacher is detached in both
    grads = torch.autograd.grad(total, embeddings)
    expected_grads = torch.autograd.grad(expected, embeddings)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_cosent_distillation_equals_the_float64_formula():
    dims, temperature, weight = [32, 16, 8], 0.05, 2.0
    embeddings = columns(1, 2, batch=8)
    labels = torch.rand(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    parts = matryoshka("cosent", dims, distill_weight=weight, distill_temperature=temperature)(
        embeddings, labels, dims=dims)
    total = parts.total
    plain = sum(LOSSES["cosent"]([unit(e, d) for e in embeddings], labels, scale=20.0) for d in dims)
    kls = cosent_distill_reference(embeddings, dims, temperature)
    torch.testing.assert_close(total, plain + weight * sum(kls))
    torch.testing.assert_close(parts.terms["distill_d8"], kls[1].detach())
    grads = torch.autograd.grad(total, embeddings)
    expected = torch.autograd.grad(plain + weight * sum(kls), embeddings)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_distillation_teacher_gets_no_gradient_from_the_kl():
    """Only the prefixes move toward the teacher: the coordinates past the largest student dim get no
    gradient from the KL term (they appear only in the detached full-width teacher)."""
    embeddings = columns(2, 2)
    loss_fn = matryoshka("contrastive", [32, 8], distill_weight=1.0, distill_temperature=0.1)
    loss_fn.matryoshka.nested_loss = lambda embeddings, labels, dims, **_: embeddings[0].new_zeros(len(dims))  # KL only
    total = loss_fn(embeddings, dims=[32, 8]).total
    grads = torch.autograd.grad(total, embeddings)
    assert all(g[:, 8:].abs().max() == 0 for g in grads)
    assert all(g[:, :8].abs().max() > 0 for g in grads)


def test_distillation_is_zero_when_prefixes_already_match_the_full_width():
    """A prefix whose cosines equal the full width's (the tail is zero) has nothing to learn: KL = 0."""
    embeddings = [torch.cat([e[:, :8], torch.zeros(6, 24, dtype=torch.float64)], 1).detach()
                  for e in columns(3, 2)]
    terms = matryoshka("contrastive", [32, 8], distill_weight=1.0)(embeddings, dims=[32, 8]).terms
    assert terms["distill_d8"].abs() < 1e-12


@pytest.mark.parametrize("rule", sorted(DIM_WEIGHT_RULES))
def test_dim_weight_rules_average_one(rule):
    weights = dim_weights(rule, [384, 256, 128, 64, 32, 16, 8])
    assert math.isclose(sum(weights) / len(weights), 1.0)


def test_dim_weight_rules_have_their_shapes():
    dims = [64, 16, 4]
    assert dim_weights("uniform", dims) == [1.0, 1.0, 1.0]
    proportional = dim_weights("proportional", dims)  # 64 : 16 : 4, averaging 1
    assert proportional == pytest.approx([64 * 3 / 84, 16 * 3 / 84, 4 * 3 / 84])
    inverse_sqrt = dim_weights("inverse_sqrt", dims)  # 1 : 2 : 4, averaging 1
    assert inverse_sqrt == pytest.approx([3 / 7, 6 / 7, 12 / 7])
    assert dim_weights("inverse", dims) == pytest.approx([3 / 21, 12 / 21, 48 / 21])  # 1 : 4 : 16


def test_rule_weights_enter_the_total():
    embeddings, dims = columns(4, 2), [32, 16, 8]
    parts = matryoshka("contrastive", dims, weights="inverse_sqrt")(embeddings, dims=dims)
    total, per_dim = parts.total, parts.per_dim
    expected = sum(w * per_dim[d] for d, w in zip(dims, dim_weights("inverse_sqrt", dims)))
    torch.testing.assert_close(total.detach(), expected)


def test_learned_weights_are_uncertainty_weighting():
    embeddings, dims = columns(5, 2), [32, 16, 8]
    loss_fn = matryoshka("contrastive", dims, weights="learned")
    assert [p.shape for p in loss_fn.parameters()] == [torch.Size([3])]
    with torch.no_grad():
        loss_fn.log_variances.copy_(torch.tensor([0.5, -0.2, 1.0]))
    parts = loss_fn(embeddings, dims=dims)
    total, per_dim = parts.total, parts.per_dim
    s = {32: 0.5, 16: -0.2, 8: 1.0}
    expected = sum(math.exp(-s[d]) * per_dim[d].item() + s[d] for d in dims)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()  # ∂L/∂s_d = 1 − exp(−s_d) L_d
    expected_grad = [1 - math.exp(-s[d]) * per_dim[d].item() for d in dims]
    assert loss_fn.log_variances.grad.tolist() == pytest.approx(expected_grad, rel=1e-5)
    assert loss_fn.current_weights() == pytest.approx({d: math.exp(-s[d]) for d in dims})


def test_always_full_puts_the_largest_dim_in_every_step():
    random.seed(0)
    sampler = DimSampler([8, 32, 16, 4], 2, always_full=True)
    drawn = [sampler() for _ in range(50)]
    assert all(dims[0] == 32 and len(dims) == 2 for dims in drawn)
    assert {dims[1] for dims in drawn} == {16, 8, 4}  # the other slot still visits every other dim


def test_cyclic_schedule_trains_every_dim_equally_often_in_order():
    loss_fn, sampler = matryoshka("contrastive", [32, 16, 8, 4, 2]), DimSampler([32, 16, 8, 4, 2], 2, "cyclic")
    embeddings = columns(6, 2)
    trained = [list(loss_fn(embeddings, None, dims=sampler()).per_dim) for _ in range(5)]
    assert trained == [[32, 16], [8, 4], [32, 2], [16, 8], [4, 2]]  # 5 calls: each dim exactly twice


def test_cyclic_schedule_with_the_full_dim_cycles_the_others():
    sampler = DimSampler([32, 24, 16, 8], 2, schedule="cyclic", always_full=True)
    assert [sampler() for _ in range(4)] == [[32, 24], [32, 16], [32, 8], [32, 24]]


def test_cyclic_schedule_under_2d_advances_once_per_step():
    """The objective draws the dims once per step and hands them to the 2D loss, which scores the last layer
    and an earlier one at those dims: the last layer still trains every dim in turn."""
    config = load_config(None, ["loss.name=contrastive", "loss.dims=[32,16,8,4]", "loss.two_d.enabled=true",
                                "loss.dim_sampling.dims_per_step=2", "loss.dim_sampling.schedule=cyclic",
                                "loss.dim_sampling.always_full=true"])
    objective = Objective(config.loss, width=32)
    generator = torch.Generator().manual_seed(0)
    embeddings = [torch.randn(6, 3, 32, generator=generator, dtype=torch.float64) for _ in range(2)]
    trained = []
    for _ in range(4):
        parts = objective(embeddings)  # the earlier layer's loss is a term ("layer1"), not a dim
        trained.append(list(parts.per_dim))
        assert list(parts.terms) in (["layer1", "kl_layer1"], ["layer2", "kl_layer2"])  # one of the 2 earlier layers
    assert trained == [[32, 16], [32, 8], [32, 4], [32, 16]]
    assert objective.dim_sampler.calls == 4


def test_schedule_position_travels_in_the_state_dict():
    sampler = DimSampler([32, 16, 8], 1, schedule="cyclic")
    for _ in range(2):
        sampler()
    restored = DimSampler([32, 16, 8], 1, schedule="cyclic")
    restored.load_state_dict(sampler.state_dict())
    assert sampler() == restored() == [8]


def test_bad_options_fail_with_the_field_name():
    with pytest.raises(ValueError, match="loss.dim_weights"):
        load_config(None, ["loss.dim_weights=cubic"])
    with pytest.raises(ValueError, match="loss.dim_sampling.always_full"):
        load_config(None, ["loss.dim_sampling.always_full=true"])
    with pytest.raises(ValueError, match="loss.dim_sampling.always_full.*dims_per_step >= 2"):
        load_config(None, ["loss.dim_sampling.dims_per_step=1", "loss.dim_sampling.always_full=true"])
    with pytest.raises(ValueError, match="loss.dim_sampling.schedule"):
        load_config(None, ["loss.dim_sampling.dims_per_step=2", "loss.dim_sampling.schedule=zigzag"])
    with pytest.raises(ValueError, match="loss.distill.weight"):
        load_config(None, ["loss.matryoshka=false", "loss.distill.weight=1"])
    assert load_config(None, ["loss.dim_weights=learned"]).loss.dim_weights == "learned"


def test_learned_weights_and_the_cycle_are_restored_on_resume(tmp_path, tiny_model_dir):
    """A run with learned weights and a cyclic schedule, resumed from step 2, ends where the 4-step run ends:
    the same model, the same learned weights, and steps 3 and 4 train the same dims."""
    options = ("loss.dims=[32,24,16,8]", "loss.dim_weights=learned", "loss.dim_weight_lr=0.1",
               "loss.dim_sampling.dims_per_step=2", "loss.dim_sampling.schedule=cyclic",
               "loss.dim_sampling.always_full=true",
               "train.max_steps=4")
    whole = run_train(tmp_path / "whole", tiny_model_dir, *options, "train.save_every=2")
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed = run_train(tmp_path / "resumed", tiny_model_dir, *options,
                        resume=tmp_path / "whole" / "run" / "checkpoints" / "step_2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def outputs(name):
        run = tmp_path / name / "run"
        steps = [json.loads(line) for line in (run / "dims_trained.jsonl").read_text().splitlines()]
        return steps, json.loads((run / "results.json").read_text())["train"]

    whole_steps, whole_train = outputs("whole")
    resumed_steps, resumed_train = outputs("resumed")
    assert [s["dims"] for s in whole_steps] == [[32, 24], [32, 16], [32, 8], [32, 24]]
    assert resumed_steps == whole_steps[2:]
    assert whole_train["dims_trained"] == {"32": 4, "24": 2, "16": 1, "8": 1}
    weights = whole_train["dim_weights"]
    assert all(abs(w - 1.0) > 1e-3 for w in weights.values())  # they were trained (all start at 1)
    assert resumed_train["dim_weights"] == pytest.approx(weights, rel=1e-5)
    torch.testing.assert_close(encode_saved(tmp_path / "resumed" / "run" / "model"),
                               encode_saved(tmp_path / "whole" / "run" / "model"), rtol=0, atol=1e-6)


def test_a_run_with_distillation_and_rule_weights_describes_them(tmp_path, tiny_model_dir):
    proc = run_train(tmp_path, tiny_model_dir, "loss.distill.weight=0.5", "loss.dim_weights=inverse_sqrt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["dim_weights"] == pytest.approx(
        dict(zip(["32", "16", "8"], dim_weights("inverse_sqrt", [32, 16, 8]))))
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "prefix self-distillation toward the full embedding, weight 0.5" in card
    assert "inverse_sqrt weights 0.68, 0.961, 1.36" in card


@pytest.mark.parametrize("k, schedule, always_full, field", [
    (0, "random", False, "dims_per_step"), (4, "random", False, "dims_per_step"),
    (2, "zigzag", False, "schedule"), (1, "cyclic", True, "always_full")])
def test_dim_sampler_refuses_what_it_cannot_draw(k, schedule, always_full, field):
    with pytest.raises(ValueError, match=field):
        DimSampler([32, 16, 8], k, schedule, always_full)


@pytest.mark.parametrize("weight, temperature", [(-1.0, 0.05), (1.0, 0.0), (float("nan"), 0.05), (1.0, float("inf"))])
def test_prefix_distillation_refuses_bad_settings(weight, temperature):
    with pytest.raises(ValueError, match="weight must be >= 0 and temperature > 0"):
        PrefixDistillation(matryoshka("contrastive", [32, 8]), NESTED_SCORES["contrastive"], weight, temperature)
