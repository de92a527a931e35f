"""The unloading core: maths, re-initialisation, optimizer reset, schedules, rank."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fastchat_plora.plora import (
    LocalWeights,
    NonFiniteAdapterError,
    StagePlan,
    adapter_parameters,
    compensated_add_,
    fresh_lora_a,
    lora_layers,
    next_stage,
    periodic_lr_lambda,
    reset_optimizer_state,
    stage_generator,
    steps_per_stage,
    unload,
    update_rank,
)
from tests.conftest import tiny_lora

INPUT = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def snapshot(model) -> dict[str, dict[str, torch.Tensor]]:
    """Per LoRA layer: base weight W, factors A and B, and scaling s (copies)."""
    return {
        name: {
            "W": layer.get_base_layer().weight.detach().clone(),
            "A": layer.lora_A["default"].weight.detach().clone(),
            "B": layer.lora_B["default"].weight.detach().clone(),
            "s": layer.scaling["default"],
        }
        for name, layer in lora_layers(model)
    }


@pytest.mark.parametrize("momentum,mode", [(0.0, "preserve"), (0.3, "preserve"), (0.1, "preserve")])
def test_logits_unchanged_across_unload(momentum, mode):
    model = tiny_lora()
    before = logits(model)
    unload(model, momentum=momentum, mode=mode, generator=stage_generator(0, 1))
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


def test_paper_mode_shifts_each_layer_by_m2_minus_m_delta():
    # The adapter keeps m^2 Delta, so each layer computes W + (1 - m + m^2) Delta: not the same function.
    m = 0.3
    model = tiny_lora()
    before, outputs = snapshot(model), logits(model)
    unload(model, momentum=m, mode="paper")
    for name, layer in lora_layers(model):
        old = before[name]
        delta = old["s"] * old["B"] @ old["A"]
        effective = (
            layer.get_base_layer().weight + old["s"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        )
        torch.testing.assert_close(effective, old["W"] + delta + (m * m - m) * delta, rtol=0, atol=1e-6)
    assert not torch.allclose(logits(model), outputs, atol=1e-4)


def test_unload_on_hand_computed_layer():
    # One 2x3 layer, r = 1, s = alpha / r = 2, m = 0.5, preserve: every number exact in fp32.
    layer = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
    model = get_peft_model(layer, LoraConfig(r=1, lora_alpha=2, target_modules=["0"]))
    ((_, lora),) = lora_layers(model)
    with torch.no_grad():
        lora.get_base_layer().weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        lora.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
        lora.lora_B["default"].weight.copy_(torch.tensor([[0.5], [2.0]]))
    report = unload(model, momentum=0.5, mode="preserve")
    # Delta = 2 * B @ A = [[1, 0, -1], [4, 0, -4]]; W += 0.5 * Delta.
    expected = torch.tensor([[1.5, 2.0, 2.5], [6.0, 5.0, 4.0]])
    assert torch.equal(lora.get_base_layer().weight, expected)
    assert report.update_norms["base_model.model.0"] == pytest.approx(0.5 * math.sqrt(34))
    kept = 2 * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
    torch.testing.assert_close(kept, 0.5 * torch.tensor([[1.0, 0.0, -1.0], [4.0, 0.0, -4.0]]))


@pytest.mark.parametrize(
    "momentum,mode,kept_factor",
    [(0.0, "preserve", 0.0), (0.3, "preserve", 0.3), (0.3, "paper", 0.09), (0.1, "paper", 0.01)],
)
def test_base_weight_gains_one_minus_m_delta(momentum, mode, kept_factor):
    model = tiny_lora()
    before = snapshot(model)
    unload(model, momentum=momentum, mode=mode, generator=stage_generator(0, 1))
    for name, layer in lora_layers(model):
        old = before[name]
        delta = old["s"] * old["B"] @ old["A"]
        torch.testing.assert_close(layer.get_base_layer().weight, old["W"] + (1 - momentum) * delta, rtol=0, atol=1e-6)
        kept = old["s"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(kept, kept_factor * delta, rtol=0, atol=1e-6)


def test_m0_unload_zeroes_b_and_redraws_a():
    model = tiny_lora()
    before = snapshot(model)
    unload(model, momentum=0.0, generator=stage_generator(0, 1))
    for name, layer in lora_layers(model):
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        a = layer.lora_A["default"].weight
        assert not torch.equal(a, before[name]["A"])


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_refresh_keeps_m_of_b_and_tops_a_up_with_the_stages_draw(momentum):
    model = tiny_lora()
    before = snapshot(model)
    unload(model, momentum=momentum, mode="refresh", generator=stage_generator(0, 1))
    draws = stage_generator(0, 1)  # the same stream: layers draw A_new in module order
    for name, layer in lora_layers(model):
        old = before[name]
        delta = old["s"] * old["B"] @ old["A"]
        a_new = fresh_lora_a(old["A"].shape, draws)
        torch.testing.assert_close(layer.get_base_layer().weight, old["W"] + (1 - momentum) * delta, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.lora_B["default"].weight, momentum * old["B"], rtol=0, atol=0)
        expected_a = momentum * old["A"] + (1 - momentum) * a_new
        torch.testing.assert_close(layer.lora_A["default"].weight, expected_a, rtol=1e-6, atol=1e-7)


def test_refresh_keeps_a_at_its_initial_scale_where_paper_shrinks_it():
    # Three unloads at m = 0.1: the literal rule leaves A at 0.1^3 of its scale, refresh near the first draw's.
    stds = {}
    for mode in ("paper", "refresh"):
        model = tiny_lora()
        first = torch.cat([layer.lora_A["default"].weight.flatten() for _, layer in lora_layers(model)]).std()
        for stage in range(1, 4):
            unload(model, momentum=0.1, mode=mode, generator=stage_generator(0, stage))
        last = torch.cat([layer.lora_A["default"].weight.flatten() for _, layer in lora_layers(model)]).std()
        stds[mode] = (last / first).item()
    assert stds["paper"] == pytest.approx(1e-3, rel=1e-4)
    assert 0.8 < stds["refresh"] < 1.0  # sqrt(m^2 + (1 - m)^2) = 0.906 per unload, drawn afresh each time


def test_refresh_needs_a_generator():
    with pytest.raises(ValueError, match="needs an explicit generator"):
        unload(tiny_lora(), momentum=0.1, mode="refresh")


REDRAW_SCRIPT = """
import hashlib, torch
from tests.conftest import tiny_lora
from fastchat_plora.plora import lora_layers, stage_generator, unload
torch.manual_seed({global_seed})  # the global RNG must not matter
model = tiny_lora()
unload(model, momentum=0.0, generator=stage_generator({seed}, 3))
h = hashlib.sha256()
for _, layer in lora_layers(model):
    h.update(layer.lora_A["default"].weight.detach().numpy().tobytes())
print(h.hexdigest())
"""


def redraw_hash(seed: int, global_seed: int) -> str:
    script = REDRAW_SCRIPT.format(seed=seed, global_seed=global_seed)
    return subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.strip()


def test_redraw_identical_across_processes_and_independent_of_global_rng():
    first, second = redraw_hash(seed=5, global_seed=1), redraw_hash(seed=5, global_seed=2)
    assert first == second
    assert redraw_hash(seed=6, global_seed=1) != first


@pytest.mark.parametrize("shape", [(8, 4096), (4, 576)])  # LLaMA-7B's fan_in at r 8; the embedded model's at r 4
def test_default_init_has_the_variance_of_pefts_default(shape):
    # PEFT's default (Kaiming-uniform, a = sqrt(5)) has std 1 / sqrt(3 fan_in); ours draws a Gaussian with it.
    expected = 1 / math.sqrt(3 * shape[1])
    a = fresh_lora_a(torch.Size(shape), stage_generator(0, 1))
    assert a.std().item() == pytest.approx(expected, rel=0.05)
    peft_default = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(peft_default, a=math.sqrt(5), generator=stage_generator(0, 1))
    assert peft_default.std().item() == pytest.approx(expected, rel=0.05)
    assert (a.abs() > 1 / math.sqrt(shape[1])).any()  # a Gaussian: not bounded like the uniform draw


def test_the_other_inits_are_pefts_uniform_and_gaussian():
    uniform = fresh_lora_a(torch.Size((8, 4096)), stage_generator(0, 1), "kaiming_uniform")
    assert uniform.abs().max() <= 1 / math.sqrt(4096) and uniform.abs().max() > 0.99 / math.sqrt(4096)
    by_rank = fresh_lora_a(torch.Size((8, 4096)), stage_generator(0, 1), "gaussian_1_over_r")
    assert by_rank.std().item() == pytest.approx(1 / 8, rel=0.05)
    with pytest.raises(ValueError, match="gaussian"):
        fresh_lora_a(torch.Size((8, 16)), stage_generator(0, 1), "gaussian")


def test_non_finite_adapter_is_refused_before_any_write():
    model = tiny_lora()
    before = snapshot(model)
    last_name, last = list(lora_layers(model))[-1]
    with torch.no_grad():
        last.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteAdapterError, match="lora_B"):
        unload(model, momentum=0.0, generator=stage_generator(0, 1))
    for name, layer in lora_layers(model):
        assert torch.equal(layer.get_base_layer().weight, before[name]["W"])


def test_unload_rejects_bad_momentum_and_mode():
    model = tiny_lora()
    with pytest.raises(ValueError, match="momentum"):
        unload(model, momentum=1.0)
    with pytest.raises(ValueError, match="momentum mode"):
        unload(model, momentum=0.1, mode="literal")
    with pytest.raises(ValueError, match="generator"):
        unload(model, momentum=0.0)


def adam_steps(model, optimizer, n: int) -> None:
    for _ in range(n):
        optimizer.zero_grad()
        model(input_ids=INPUT, labels=INPUT).loss.backward()
        optimizer.step()


def test_optimizer_reset_zeroes_adapter_state_only():
    model = tiny_lora()
    extra = torch.nn.Parameter(torch.zeros(3))  # stands for any non-adapter group (e.g. full-FT params)
    adapters = adapter_parameters(model)
    optimizer = torch.optim.AdamW([{"params": adapters}, {"params": [extra]}], lr=1e-3, betas=(0.9, 0.99))
    extra.grad = torch.ones(3)
    adam_steps(model, optimizer, 3)
    extra_state = {k: v.clone() for k, v in optimizer.state[extra].items()}
    ids_before = [id(p) for p in adapters]

    assert reset_optimizer_state(optimizer, adapters) == len(adapters)
    assert [id(p) for p in adapter_parameters(model)] == ids_before
    for p in adapters:
        state = optimizer.state[p]
        assert float(state["step"]) == 0
        assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0
    for key, value in optimizer.state[extra].items():
        assert torch.equal(value, extra_state[key])


def test_step_after_reset_equals_fresh_adam_first_step():
    model = tiny_lora()
    adapters = adapter_parameters(model)
    optimizer = torch.optim.AdamW(adapters, lr=1e-3, betas=(0.9, 0.99))
    adam_steps(model, optimizer, 3)
    reset_optimizer_state(optimizer, adapters)
    twin = tiny_lora()
    twin.load_state_dict(model.state_dict())
    fresh = torch.optim.AdamW(adapter_parameters(twin), lr=1e-3, betas=(0.9, 0.99))
    adam_steps(model, optimizer, 1)
    adam_steps(twin, fresh, 1)
    for p, q in zip(adapters, adapter_parameters(twin)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_reset_that_keeps_step_would_overshoot():
    # Why `step` must be reset: with zeroed moments but a large step count, bias correction no
    # longer scales the first moments up, and with beta2 = 0.999 the first update is about
    # sqrt(1 - 0.999) / (1 - 0.9) = 3.2x a fresh Adam's (which moves each entry by exactly lr).
    model = tiny_lora()
    adapters = adapter_parameters(model)
    optimizer = torch.optim.AdamW(adapters, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    adam_steps(model, optimizer, 1)
    p = adapters[1]  # a B factor: every entry gets a gradient
    for keep_step, bound in ((True, (2.8e-3, 3.3e-3)), (False, (0.9e-3, 1.0001e-3))):
        reset_optimizer_state(optimizer, adapters)
        if keep_step:
            for q in adapters:
                optimizer.state[q]["step"].fill_(10_000)
        before = p.detach().clone()
        adam_steps(model, optimizer, 1)
        largest = (p.detach() - before).abs().max().item()
        assert bound[0] < largest < bound[1], (keep_step, largest)


def test_next_stage_unloads_and_resets():
    model = tiny_lora()
    adapters = adapter_parameters(model)
    optimizer = torch.optim.AdamW(adapters, lr=1e-3)
    adam_steps(model, optimizer, 2)
    report = next_stage(model, plan=StagePlan(steps=2), stage=0, optimizer=optimizer)
    assert len(report.layers) == 14
    assert all(float(optimizer.state[p]["step"]) == 0 for p in adapters)


def test_steps_per_stage_from_steps_and_samples():
    assert steps_per_stage(200, None, 24) == 200
    assert steps_per_stage(None, 4800, 24) == 200  # the paper: 4.8k samples at global batch 24
    assert steps_per_stage(None, 4800, 8 * 3 * 1) == 200  # batch 8, accumulation 3, one rank
    assert steps_per_stage(None, 16, 2 * 2 * 2) == 2  # batch 2, accumulation 2, two ranks
    for bad in [(None, None, 24), (5, 5, 24), (0, None, 24), (None, -1, 24)]:
        with pytest.raises(ValueError):
            steps_per_stage(*bad)


@pytest.mark.parametrize(
    "steps,step,stage,boundary",
    [
        (4, 0, 0, False),  # before the first step
        (4, 1, 0, False),
        (4, 4, 0, True),  # the last step of stage 0: an unload follows
        (4, 5, 1, False),
        (4, 8, 1, True),
        (4, 10, 2, False),
        (4, 12, 2, False),  # the run's last step: the final merge, not an unload
        (None, 7, 0, False),  # plain LoRA: one stage
    ],
)
def test_stage_plan_places_steps_in_stages(steps, step, stage, boundary):
    plan = StagePlan(steps=steps)
    assert plan.stage_of(step) == stage
    assert plan.is_boundary(step, max_steps=12) == boundary


@pytest.mark.parametrize("steps,total,count", [(4, 12, 3), (4, 13, 4), (4, 3, 1), (1, 5, 5), (None, 100, 1)])
def test_stage_plan_counts_stages(steps, total, count):
    assert StagePlan(steps=steps).count(total) == count


def test_stage_plan_generators_repeat_and_differ_by_stage():
    plan = StagePlan(steps=2, seed=5)
    first = torch.randn(4, generator=plan.generator(1))
    assert torch.equal(first, torch.randn(4, generator=StagePlan(steps=9, seed=5).generator(1)))
    assert not torch.equal(first, torch.randn(4, generator=plan.generator(2)))


@pytest.mark.parametrize(
    "kwargs,message",
    [({"steps": 0}, "stage length"), ({"momentum": 1.0}, "momentum"), ({"mode": "x"}, "momentum mode"),
     ({"init": "zeros"}, "init method")],
)  # fmt: skip
def test_stage_plan_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StagePlan(**kwargs)


def test_periodic_schedule_restarts_each_stage():
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    one_stage = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10)
    periodic = periodic_lr_lambda(one_stage.lr_lambdas[0], 10)
    first = [periodic(s) for s in range(10)]
    assert first[0] == 0.0 and first[2] == 1.0 and first[9] < 0.1
    assert [periodic(s) for s in range(10, 20)] == first
    assert [periodic(s) for s in range(30, 40)] == first


@pytest.mark.parametrize("r,stages", [(1, 1), (4, 1), (4, 3), (8, 4), (8, 10)])
def test_accumulated_update_rank_is_min_tr_d(r, stages):
    model = tiny_lora(r=r)
    w0 = {name: layer.get_base_layer().weight.detach().clone() for name, layer in lora_layers(model)}
    gen = torch.Generator().manual_seed(3)
    for stage in range(stages):
        with torch.no_grad():  # stands in for a stage of training: B moves away from zero
            for _, layer in lora_layers(model):
                b = layer.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        unload(model, momentum=0.0, generator=stage_generator(0, stage + 1))
    for name, layer in lora_layers(model):
        w = layer.get_base_layer().weight.detach()
        assert update_rank(w, w0[name], w.dtype).numerical_rank == min(stages * r, *w.shape), name


def merge_many(n: int, rank: int, scale: float, same_direction: bool, seed: int = 0):
    """Merge n small low-rank updates into bf16 weights, plainly and compensated; fp64 reference."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(64, 64, generator=gen).to(torch.bfloat16)
    plain, kahan, comp, reference = w0.clone(), w0.clone(), torch.zeros_like(w0), w0.double()
    u, v = torch.randn(64, rank, generator=gen), torch.randn(rank, 64, generator=gen)
    for _ in range(n):
        if not same_direction:
            u, v = torch.randn(64, rank, generator=gen), torch.randn(rank, 64, generator=gen)
        update = (u @ v) * scale
        reference += update.double()
        compensated_add_(plain, update, None)
        compensated_add_(kahan, update, comp)
    total = (reference - w0.double()).norm()

    def error(w):
        return ((w.double() - reference).norm() / total).item()

    # The best any bf16 weight can do: the fp64 result rounded to bf16 once.
    return error(plain), error(kahan), error(reference.to(torch.bfloat16))


@pytest.mark.parametrize("rank,scale,same_direction", [(1, 1e-3, True), (4, 2e-3, False), (4, 1e-2, False)])
def test_compensated_merges_match_one_final_rounding(rank, scale, same_direction):
    plain, kahan, best = merge_many(200, rank, scale, same_direction)
    # Within 5% of rounding the exact sum once (the bf16-stored compensation costs the rest).
    assert kahan <= best * 1.05
    assert plain > 2.5 * kahan  # without compensation the merges drift


def test_tiny_merges_vanish_without_compensation():
    # 200 merges of 1e-3 into weights near 1 (half a bf16 step there is 3.9e-3): each plain merge
    # is rounded away, while the compensated sum, 0.2 per unit direction, survives.
    plain, kahan, best = merge_many(200, 1, 1e-3, True)
    assert plain > 0.5 and kahan < 0.02


def test_unload_compensates_only_low_precision_weights():
    model = tiny_lora()
    first_name, first = next(lora_layers(model))
    first.get_base_layer().weight.data = first.get_base_layer().weight.data.to(torch.bfloat16)
    compensation = {}
    unload(model, momentum=0.0, generator=stage_generator(0, 1), weights=LocalWeights(compensation))
    assert list(compensation) == [first_name]
    assert compensation[first_name].dtype == torch.bfloat16


def test_non_finite_stage_is_discarded_not_merged():
    model = tiny_lora()
    before = snapshot(model)
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-3)
    adam_steps(model, optimizer, 1)
    _, last = list(lora_layers(model))[-1]
    with torch.no_grad():
        last.lora_A["default"].weight[0, 0] = float("inf")
    report = next_stage(model, plan=StagePlan(steps=2), stage=0, optimizer=optimizer)
    assert report.skipped and not report.update_norms
    for name, layer in lora_layers(model):
        assert torch.equal(layer.get_base_layer().weight, before[name]["W"])
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert torch.isfinite(layer.lora_A["default"].weight).all()
    assert all(float(optimizer.state[p]["step"]) == 0 for p in adapter_parameters(model))
