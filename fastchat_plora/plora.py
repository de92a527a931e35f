"""The PeriodicLoRA core: unload the adapters into the base weights and start a new stage.

PLoRA (Meng et al. 2024) trains LoRA adapters in stages. At the end of stage t every adapted
linear layer with base weight W, adapter factors A (r x in), B (out x r) and scaling s = alpha / r
is updated as

    Delta = s * B @ A                       (computed in fp32)
    W    <- W + (1 - m) * Delta             (cast back to W's dtype once)

and the adapter starts the next stage from

    m = 0:                 A ~ init (see INIT_METHODS),  B = 0
    m > 0, mode "preserve": A <- sqrt(m) * A,  B <- sqrt(m) * B   (adapter keeps m * Delta)
    m > 0, mode "paper":    A <- m * A,        B <- m * B         (adapter keeps m^2 * Delta)
    m > 0, mode "refresh":  A <- m * A + (1 - m) * A_new,  B <- m * B,  A_new ~ init

With m = 0 or mode "preserve" the function computed by the model is unchanged by an unload;
"paper" is the literal reading of Section 5.2 and shifts the output by (m^2 - m) * Delta.
"refresh" reads momentum as partial replacement: the kept share of A is topped up with a fresh
draw (the paper's Section 3 draws A_t anew at every stage), so A keeps its initial scale instead of
shrinking by m at every unload; the adapter keeps m^2 * Delta + m (1 - m) s B A_new.
After T stages W_T - W_0 = sum_t (1 - m) s B_t A_t has rank up to T * r.

This module knows nothing of the Trainer, files or launchers: it takes modules, an optimizer,
a learning-rate lambda and a generator. Every write goes through ``copy_``/``add_``/``mul_`` on
the existing tensors so the Parameter objects, and the optimizer's references to them, survive.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer

MOMENTUM_MODES = ("preserve", "paper", "refresh")
# How A is drawn at stage 0 and at every re-draw (A is r x fan_in):
#   kaiming_gaussian   N(0, 1 / (3 fan_in)): the variance of PEFT's default init, as a Gaussian (the paper
#                      says Gaussian; its FastChat + PEFT framework drew A with PEFT's default)
#   kaiming_uniform    PEFT's default itself: Kaiming-uniform with a = sqrt(5), U(-1/sqrt(fan_in), 1/sqrt(fan_in))
#   gaussian_1_over_r  N(0, 1 / r^2): PEFT's init_lora_weights="gaussian"
INIT_METHODS = ("kaiming_gaussian", "kaiming_uniform", "gaussian_1_over_r")
DEFAULT_INIT = "kaiming_gaussian"
PAPER_STAGE_SAMPLES = 4800  # the paper's stage length, the default when none is given


class NonFiniteAdapterError(RuntimeError):
    """An adapter holds NaN or Inf, so its update must not be merged into the base weights."""


@dataclass
class UnloadReport:
    """What one unload did: which layers it touched and the Frobenius norm of each merged update."""

    momentum: float
    mode: str
    update_norms: dict[str, float] = field(default_factory=dict)
    skipped: bool = False  # True when a non-finite adapter was discarded instead of merged
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (c * B, A)

    @property
    def layers(self) -> list[str]:
        return list(self.update_norms)

    @property
    def total_norm(self) -> float:
        return math.sqrt(sum(n * n for n in self.update_norms.values()))


def lora_layers(model: torch.nn.Module, adapter_name: str = "default") -> Iterator[tuple[str, LoraLayer]]:
    """Yield (name, layer) for every LoRA layer holding ``adapter_name``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


def stage_generator(seed: int, stage: int) -> torch.Generator:
    """A CPU generator determined by (seed, stage) alone, so every data-parallel rank agrees.

    Hashing keeps nearby (seed, stage) pairs from giving overlapping streams.
    """
    digest = hashlib.sha256(f"plora:{seed}:{stage}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def fresh_lora_a(shape: torch.Size, generator: torch.Generator, method: str = DEFAULT_INIT) -> torch.Tensor:
    """A new A drawn on the CPU in fp32, so its values depend on neither device nor dtype."""
    fresh = torch.empty(shape, dtype=torch.float32)
    rank, fan_in = shape
    if method == "kaiming_gaussian":
        fresh.normal_(mean=0.0, std=1.0 / math.sqrt(3 * fan_in), generator=generator)
    elif method == "kaiming_uniform":
        torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
    elif method == "gaussian_1_over_r":
        fresh.normal_(mean=0.0, std=1.0 / rank, generator=generator)
    else:
        raise ValueError(f"unknown init method {method!r}; expected one of {INIT_METHODS}")
    return fresh


def next_factors(
    a: torch.Tensor, b: torch.Tensor, momentum: float, mode: str, generator: torch.Generator | None, init: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter the next stage starts from: a fresh (A, 0) for m = 0, else the kept share of (A, B),
    A topped up with a fresh draw under ``refresh``."""
    if momentum == 0.0:
        return fresh_lora_a(a.shape, generator, init), torch.zeros(b.shape, dtype=torch.float32)
    keep = math.sqrt(momentum) if mode == "preserve" else momentum
    new_a = a.float() * keep
    if mode == "refresh":
        new_a = new_a.add_(fresh_lora_a(a.shape, generator, init).to(a.device), alpha=1.0 - momentum)
    return new_a, b.float() * keep


class LocalWeights:
    """How an unload reads and writes weights that this process holds whole.

    `unload`, `reinit_adapters`, `next_stage` and `replay` do all their maths through one of these,
    so the maths is written once; `distributed.py` overrides the access for several processes: data
    parallel, where each rank keeps the Kahan buffers of a share of the layers, and DeepSpeed ZeRO,
    where the adapters' fp32 masters live in the optimizer and ZeRO-3 partitions every weight.

    ``compensation``, when given, holds the Kahan buffers of the bf16/fp16 base weights by layer
    name; None merges without compensation. `allocate` creates them, zero, before training starts,
    so the memory they take is known from step 0 (a buffer missing at a merge, as in a direct call
    to `unload`, is created then). Replaying a run's stages rebuilds them.
    """

    def __init__(self, compensation: dict[str, torch.Tensor] | None = None):
        self.compensation = compensation

    def read(self, param: torch.Tensor) -> torch.Tensor:
        """The full value of an adapter factor."""
        return param.detach()

    def write(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Set an adapter factor in place (the optimizer keeps its reference to the Parameter)."""
        with torch.no_grad():
            param.copy_(value)

    def shape(self, param: torch.Tensor) -> torch.Size:
        return param.shape

    def compute_device(self, param: torch.Tensor) -> torch.device:
        """Where `read` puts the value of ``param``, and so where the unload computes its product."""
        return param.device

    def keeps(self, name: str, weight: torch.Tensor) -> bool:
        """Whether this process keeps (and merges with) the Kahan buffer of layer ``name``."""
        return True

    def new_buffer(self, weight: torch.Tensor) -> torch.Tensor:
        """A zero Kahan buffer for ``weight``: its dtype, device and shape."""
        return torch.zeros_like(weight)

    def allocate(self, model: torch.nn.Module, adapter_name: str = "default") -> int:
        """Create, zero, the Kahan buffers this process keeps; returns their size in bytes (0 without compensation)."""
        if self.compensation is None:
            return 0
        for name, layer in lora_layers(model, adapter_name):
            self.buffer(name, layer.get_base_layer().weight)
        return sum(b.numel() * b.element_size() for b in self.compensation.values())

    def buffer(self, name: str, weight: torch.Tensor) -> torch.Tensor | None:
        """The Kahan buffer to merge ``weight`` with, or None for a plain merge."""
        if self.compensation is None or not needs_compensation(weight) or not self.keeps(name, weight):
            return None
        if name not in self.compensation:
            self.compensation[name] = self.new_buffer(weight)
        return self.compensation[name]

    def load_buffer(self, name: str, weight: torch.Tensor, value: torch.Tensor) -> None:
        """Set layer ``name``'s Kahan buffer from a saved whole one (checkpoints of the earlier layout)."""
        if (buffer := self.buffer(name, weight)) is not None:
            buffer.copy_(value)

    def merge(self, name: str, weight: torch.Tensor, first_row: int, update: torch.Tensor) -> None:
        """weight[rows] += update (fp32) for the block of rows starting at ``first_row``, rounded once to the
        weight's dtype, compensated where a buffer is kept."""
        rows = slice(first_row, first_row + update.shape[0])
        buffer = self.buffer(name, weight)
        compensated_add_(weight[rows], update.to(weight.device), None if buffer is None else buffer[rows])

    def merged(self, name: str, weight: torch.Tensor) -> None:
        """Every block of ``weight`` has been merged (where several processes share the work, they sync here)."""

    def reset_optimizer(self, optimizer, model: torch.nn.Module, adapter_name: str = "default") -> int:
        """Zero the adapters' optimizer state; returns how many parameters had state."""
        return reset_optimizer_state(optimizer, adapter_parameters(model, adapter_name))


LOCAL = LocalWeights()


def reinit_adapters(
    model: torch.nn.Module,
    generator: torch.Generator,
    *,
    init: str = DEFAULT_INIT,
    weights: LocalWeights = LOCAL,
    adapter_name: str = "default",
) -> None:
    """Start a fresh adapter everywhere: A re-drawn from ``generator`` in module order, B = 0."""
    with torch.no_grad():
        for _, layer in lora_layers(model, adapter_name):
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            weights.write(a, fresh_lora_a(weights.shape(a), generator, init))
            weights.write(b, torch.zeros(weights.shape(b)))


def compensated_add_(weight: torch.Tensor, update: torch.Tensor, compensation: torch.Tensor | None) -> None:
    """weight += update, rounding once to weight's dtype; with Kahan compensation when given.

    A bf16 weight cannot hold an update smaller than half its rounding step, so repeated merges
    lose the small ones and fill W_T - W_0 with rounding noise. The compensation buffer (same
    dtype and device as the weight) carries what each rounding dropped into the next merge:
        y = update - c;  t = round(w + y);  c = (t - w) - y;  w = t
    The arithmetic runs in fp32; c is stored in the weight's dtype, which is enough because c is
    below one rounding step of w and only its leading bits matter.
    """
    w = weight.float()
    if compensation is None:
        weight.copy_(w.add_(update))
        return
    y = update - compensation.float()
    t = (w + y).to(weight.dtype)
    compensation.copy_((t.float() - w).sub_(y))
    weight.copy_(t)


def needs_compensation(weight: torch.Tensor) -> bool:
    return weight.dtype in (torch.bfloat16, torch.float16)


MERGE_BLOCK = 2**22  # elements of the weight merged at a time: 32 MiB of fp64 product, a bounded transient


def update_blocks(scaled_b: torch.Tensor, a: torch.Tensor, transposed: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, fp32 update) for blocks of rows of the weight, whose update is scaled_b @ A (transposed
    for a weight stored as (in, out)). Every caller splits a weight into the same blocks, so every path that
    merges it (unload, replay, one rank's ZeRO-3 partition) rounds the same products.

    The product is taken in fp64 and rounded to fp32 once: no TF32 or autocast setting reaches fp64
    matmuls, so the update is the same whatever precision the training process chose (a rank-r product
    costs nothing beside a training step). PEFT's ``get_delta_weight`` computes in the adapter's dtype,
    hence this product of our own. Apple GPUs have no fp64 (nor TF32): fp32 there.
    """
    dtype = torch.float32 if a.device.type == "mps" else torch.float64
    b, a = scaled_b.to(dtype), a.to(dtype)
    rows, columns = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
    step = max(1, MERGE_BLOCK // columns)
    for first in range(0, rows, step):
        block = (b @ a[:, first : first + step]).T if transposed else b[first : first + step] @ a
        yield first, block.float()


def merge_(layer: LoraLayer, name: str, scaled_b: torch.Tensor, a: torch.Tensor, weights: LocalWeights) -> float:
    """W += scaled_b @ A for one layer, block by block (`update_blocks`), each rounded once to W's dtype and
    compensated where ``weights`` keeps a buffer. The one merge both `unload` and `replay` make, so a replay
    from the stage files gives the bits the run had. Returns the Frobenius norm of the merged update.
    """
    weight, squares = layer.get_base_layer().weight, 0.0
    for first_row, block in update_blocks(scaled_b, a, getattr(layer, "fan_in_fan_out", False)):
        weights.merge(name, weight, first_row, block)
        squares += torch.linalg.vector_norm(block).item() ** 2
    weights.merged(name, weight)
    return math.sqrt(squares)


def unload(
    model: torch.nn.Module,
    *,
    momentum: float = 0.0,
    mode: str = "preserve",
    generator: torch.Generator | None = None,
    init: str = DEFAULT_INIT,
    weights: LocalWeights = LOCAL,
    adapter_name: str = "default",
) -> UnloadReport:
    """Merge (1 - momentum) of every adapter into its base weight and start the next stage.

    See the module docstring for the maths. ``generator`` is required when A is drawn anew
    (``momentum == 0``, or mode ``refresh``) and unused otherwise. ``weights`` says how to reach the weights and
    holds the compensation buffers (`LocalWeights`, or ZeRO's); every rank calls this under ZeRO,
    and visits the layers in module order, so all draw the same A. The report holds each layer's
    merged factors (c * B, A), c = (1 - m) * scaling, on the CPU: the adapter's size.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if mode not in MOMENTUM_MODES:
        raise ValueError(f"unknown momentum mode {mode!r}; expected one of {MOMENTUM_MODES}")
    if (momentum == 0.0 or mode == "refresh") and generator is None:
        raise ValueError(f"an unload with momentum {momentum} ({mode}) draws a new A and needs an explicit generator")

    layers = list(lora_layers(model, adapter_name))
    if not layers:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter_name!r}")
    factors = {
        name: (weights.read(layer.lora_A[adapter_name].weight), weights.read(layer.lora_B[adapter_name].weight))
        for name, layer in layers
    }
    # Checked before any write, so a bad adapter leaves every base weight intact.
    for name, pair in factors.items():
        for factor, value in zip(("lora_A", "lora_B"), pair):
            if not torch.isfinite(value).all():
                raise NonFiniteAdapterError(f"{name}.{factor} holds NaN or Inf; refusing to merge it")

    report = UnloadReport(momentum=momentum, mode=mode, factors={})
    with torch.no_grad():
        for name, layer in layers:
            a, b = factors[name]
            scaled_b = b.float() * ((1.0 - momentum) * layer.scaling[adapter_name])
            report.update_norms[name] = merge_(layer, name, scaled_b, a, weights)
            report.factors[name] = (scaled_b.cpu(), a.float().cpu().clone())
            new_a, new_b = next_factors(a, b, momentum, mode, generator, init)
            weights.write(layer.lora_A[adapter_name].weight, new_a)
            weights.write(layer.lora_B[adapter_name].weight, new_b)
    return report


def replay(
    model: torch.nn.Module,
    stages: Iterable[dict[str, tuple[torch.Tensor, torch.Tensor]]],
    *,
    weights: LocalWeights = LOCAL,
    adapter_name: str = "default",
) -> int:
    """Merge recorded stages into the base weights again, in order: W_0 -> W_t, bit for bit.

    Each stage maps a layer name (PEFT's, as in `UnloadReport.factors`) to the factors its unload
    merged, (c * B, A). The product is computed on the device the unload computed it on
    (``weights.compute_device``) through the same `merge_`, and the compensation buffers are
    rebuilt along the way, so the weights equal those of the run that recorded the stages. A
    skipped stage (no factors) merges nothing. Returns the number of stages replayed.
    """
    layers = dict(lora_layers(model, adapter_name))
    count = 0
    with torch.no_grad():
        for stage in stages:
            unknown = set(stage) - set(layers)
            if unknown:
                raise ValueError(f"a recorded stage adapts layers this model lacks: {sorted(unknown)[0]}")
            for name, layer in layers.items():
                if name in stage:
                    device = weights.compute_device(layer.lora_A[adapter_name].weight)
                    scaled_b, a = stage[name]
                    merge_(layer, name, scaled_b.to(device), a.to(device), weights)
            count += 1
    return count


def adapter_parameters(model: torch.nn.Module, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """The A and B parameters of every LoRA layer."""
    params = []
    for _, layer in lora_layers(model, adapter_name):
        params += [layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight]
    return params


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Zero the optimizer state (moments and step counts) of ``params`` in place.

    Zeroing rather than deleting keeps the state tensors' storage, so memory does not churn at
    each unload, and an Adam step from zeroed state is exactly the first step of a fresh Adam.
    The step count matters: with zero moments but step = k, bias correction divides by
    (1 - beta^k) ~ 1 instead of (1 - beta) and the first update comes out several times too large.
    Returns the number of parameters whose state was reset.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the real one
    count = 0
    for p in params:
        state = optimizer.state.get(p)
        if state:
            zero_state_(state)
            count += 1
    return count


def zero_state_(state: dict) -> None:
    """One parameter's optimizer state back to a fresh start: tensors zeroed in place, counts to 0."""
    for key, value in state.items():
        if torch.is_tensor(value):
            value.zero_()
        elif isinstance(value, (int, float)):
            state[key] = type(value)(0)


def periodic_lr_lambda(lr_lambda: Callable[[int], float], period: int) -> Callable[[int], float]:
    """Restart a learning-rate schedule every ``period`` optimizer steps.

    Each stage then re-runs the configured schedule from its start (constant for the paper,
    warmup + cosine per stage as an option), and the restart needs no state of its own.
    """
    if period <= 0:
        raise ValueError(f"period must be positive, got {period}")

    # A closure, not a callable object: LambdaLR then keeps it out of its state_dict, so
    # checkpoints hold only last_epoch, from which the stage position follows.
    def periodic(step: int) -> float:
        return lr_lambda(step % period)

    return periodic


def steps_per_stage(
    unload_every_steps: int | None,
    unload_every_samples: int | None,
    global_batch_size: int,
) -> int:
    """The stage length in optimizer steps, from a period in steps or in training samples.

    One optimizer step consumes ``global_batch_size`` = per-device batch x gradient
    accumulation x world size samples, so the paper's 4.8k samples at batch 24 is 200 steps.
    A sample period that is not a multiple of the global batch rounds to the nearest step.
    """
    if (unload_every_steps is None) == (unload_every_samples is None):
        raise ValueError("give exactly one of unload_every_steps and unload_every_samples")
    if unload_every_steps is not None:
        if unload_every_steps <= 0:
            raise ValueError(f"unload_every_steps must be positive, got {unload_every_steps}")
        return unload_every_steps
    if unload_every_samples <= 0:
        raise ValueError(f"unload_every_samples must be positive, got {unload_every_samples}")
    return max(1, round(unload_every_samples / global_batch_size))


@dataclass(frozen=True)
class StagePlan:
    """When stages end and how each unload treats the adapter: the stage arithmetic in one place.

    Optimizer steps count from 1. With ``steps = K`` stage t (from 0) runs steps t*K + 1 .. (t+1)*K
    and ends in an unload after step (t+1)*K, except the run's last step, which ends in the final
    merge instead. ``steps = None`` is plain LoRA: one stage, only the final merge. Stage t's A is
    drawn from ``generator(t)``, so every rank and every resumed run draws the same.
    """

    steps: int | None = None
    momentum: float = 0.0
    mode: str = "preserve"
    init: str = DEFAULT_INIT
    seed: int = 0

    def __post_init__(self):
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"stage length must be positive, got {self.steps}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.mode not in MOMENTUM_MODES:
            raise ValueError(f"unknown momentum mode {self.mode!r}; expected one of {MOMENTUM_MODES}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"unknown init method {self.init!r}; expected one of {INIT_METHODS}")

    def stage_of(self, step: int) -> int:
        """The stage optimizer step ``step`` belongs to (step 0, before training, is in stage 0)."""
        return (max(step, 1) - 1) // self.steps if self.steps else 0

    def is_boundary(self, step: int, max_steps: int) -> bool:
        """Whether an unload follows step ``step`` (the last step gets the final merge instead)."""
        return bool(self.steps) and 0 < step < max_steps and step % self.steps == 0

    def count(self, total_steps: int) -> int:
        """How many stages a run of ``total_steps`` steps has (the last may be short)."""
        return -(-total_steps // self.steps) if self.steps else 1

    def generator(self, stage: int) -> torch.Generator:
        """The generator stage ``stage``'s A is drawn from."""
        return stage_generator(self.seed, stage)


def next_stage(
    model: torch.nn.Module,
    *,
    plan: StagePlan,
    stage: int,
    optimizer: torch.optim.Optimizer | None = None,
    weights: LocalWeights = LOCAL,
    final: bool = False,
) -> UnloadReport:
    """End stage ``stage``: unload the adapters and reset their optimizer state.

    The next stage's A is drawn from ``plan.generator(stage + 1)``. ``final`` merges the whole
    adapter (momentum 0), whatever the plan's momentum, so the saved model computes what the
    trained model computes. The learning-rate restart needs no call here: the schedule itself is
    periodic (``periodic_lr_lambda``). An adapter holding NaN or Inf is not merged: every adapter
    is re-initialised instead, the base weights stay as they were, and the report says ``skipped``.
    """
    momentum = 0.0 if final else plan.momentum
    generator = plan.generator(stage + 1)
    try:
        report = unload(model, momentum=momentum, mode=plan.mode, generator=generator, init=plan.init, weights=weights)
    except NonFiniteAdapterError:
        reinit_adapters(model, generator, init=plan.init, weights=weights)
        report = UnloadReport(momentum=momentum, mode=plan.mode, skipped=True)
    if optimizer is not None:
        weights.reset_optimizer(optimizer, model)
    return report


@dataclass
class RankReport:
    numerical_rank: int
    tolerance: float
    top_singular_values: list[float]


def update_rank(w_final: torch.Tensor, w_initial: torch.Tensor, storage_dtype: torch.dtype, top: int = 5) -> RankReport:
    """Numerical rank of W_T - W_0, computed in fp64.

    A singular value counts when it exceeds (sqrt(m) + sqrt(n)) * eps(storage dtype) * rms(W_T).
    Rounding W_T to its storage dtype once adds an error of at most half a rounding step per
    entry (std <= eps * |w| / sqrt(12)), and a random m x n matrix of such entries has spectral
    norm about std * (sqrt(m) + sqrt(n)): the tolerance sits ~3.5x above that noise floor. So a
    single rounding is not counted as rank, while every real stage's contribution is; rounding
    noise accumulated over many plain bf16 merges rises above it and shows up as extra rank.
    """
    delta = w_final.double() - w_initial.double()
    sigma = torch.linalg.svdvals(delta)
    m, n = delta.shape
    rms = w_final.double().pow(2).mean().sqrt().item()
    tol = (m**0.5 + n**0.5) * torch.finfo(storage_dtype).eps * rms
    return RankReport(int((sigma > tol).sum()), tol, sigma[:top].tolist())
