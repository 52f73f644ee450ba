"""Multi-task loss weighting by name (`weighting=uncertainty`, `weighting=pcgrad`...).

Each strategy is one file with a ``Weighting`` subclass registered in ``WEIGHTINGS``. Two kinds:

* loss-based (``gradient_based = False``): ``combine(losses)`` turns the per-task losses into
  one objective and the engine backpropagates it as usual (equal, fixed, uncertainty, dwa, famo);
* gradient-based (``gradient_based = True``): ``combine_grads(G, losses)`` turns the per-task
  gradients on the shared trunk, ``G`` [K, P], into one update direction for the trunk, and
  says which weight each task's loss gets for its own (non-shared) parameters
  (gradnorm, pcgrad, cagrad).

``weighted_backward`` is what the engine calls instead of ``loss.backward()``; it hides the
difference. A strategy's whole state (learned parameters, loss histories, its own optimiser,
its random generator) lives in its ``state_dict`` so that a resumed run is bit-identical.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.registry import Registry

WEIGHTINGS: Registry = Registry("weighting", "weighting")

def settings_default(key: str):
    """The default of the `weighting.<key>` a strategy declares in its settings."""
    from kdmtl_cli.plugins import load_builtin

    load_builtin()
    for name in WEIGHTINGS.names():
        settings = WEIGHTINGS.settings(name)
        for f in dataclasses.fields(settings) if settings is not None else ():
            if f.name == key:
                return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    raise KeyError(f"no weighting declares '{key}'")


def field(cfg, key: str):
    """`cfg.<key>`, or its declared default when the node lacks it (tests pass plain namespaces)."""
    return getattr(cfg, key) if hasattr(cfg, key) else settings_default(key)


def number(cfg, key: str) -> float:
    """`cfg.<key>` as a finite float, or a one-line KdmtlError naming `weighting.<key>`."""
    value = field(cfg, key)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise KdmtlError(f"weighting.{key} must be a finite number (got {value!r})")
    return float(value)


class Weighting(torch.nn.Module):
    """Base of every strategy. Subclasses set ``name`` and ``gradient_based``, implement
    ``combine`` or ``combine_grads``, and are registered with the settings dataclass of the
    `weighting.*` keys they read (``WEIGHTINGS.register(name, settings=...)``). A gradient-based
    strategy combines per-task gradients, which are per rank with several data-parallel
    processes: run.py refuses those there (until they are gathered)."""

    name = ""
    gradient_based = False

    # When set, the engine clips the norm of the shared trunk's gradient to this value after the
    # backward (and after data-parallel averaging), before any `optim.grad_clip_norm` (FAMO).
    shared_clip_norm: float | None = None

    def __init__(self, cfg, task_names: list[str], seed: int = 0):
        super().__init__()
        if not task_names:
            raise ValueError("a weighting needs at least one task")
        self.task_names = list(task_names)
        self.num_tasks = len(self.task_names)
        self.seed = seed

    # -- helpers -------------------------------------------------------------------------
    def stack(self, losses: dict[str, Tensor]) -> Tensor:
        """The losses as a [K] tensor in task order (the graph is kept)."""
        if set(losses) != set(self.task_names):
            raise ValueError(f"losses for {sorted(losses)} given, expected {self.task_names}")
        return torch.stack([losses[t] for t in self.task_names])

    def as_dict(self, vector: Tensor) -> dict[str, Tensor]:
        """[K] tensor -> {task: detached 0-dim tensor}."""
        vector = vector.detach()
        return {t: vector[k] for k, t in enumerate(self.task_names)}

    # -- the interface -------------------------------------------------------------------
    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss-based strategies: (total loss to backprop, {task: weight, detached 0-dim})."""
        raise NotImplementedError(f"weighting {self.name} is gradient-based; use combine_grads")

    def combine_grads(self, grads: Tensor, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Gradient-based strategies: ``grads`` [K, P] (row k: gradient of task k's loss on the
        flattened shared parameters) -> (shared update direction [P], {task: weight of its loss
        for the task-specific parameters})."""
        raise NotImplementedError(f"weighting {self.name} is loss-based; use combine")

    def head_weights(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """Gradient-based strategies: the weight of each task's loss for the task-specific
        parameters, given the weights ``combine_grads`` returned (those are what is logged)."""
        return weights

    def after_step(self, losses: dict[str, Tensor]) -> None:
        """Called once per step, after the optimiser step, with this step's detached losses."""

    def end_epoch(self, mean_losses: dict[str, float]) -> None:
        """Called after each training epoch with each task's epoch-mean training loss."""

    def param_groups(self, base_lr: float) -> list[dict]:
        """Parameters the model optimiser should train (none, unless a subclass says so)."""
        return []


def _is_default(value, default) -> bool:
    if isinstance(value, bool) or hasattr(value, "items") or not isinstance(value, (Real, str)):
        return False  # `true` is not 1.0, a mapping is never the scalar default
    return value == default


def build_weighting(cfg, task_names: list[str], seed: int = 0) -> Weighting:
    """The strategy `cfg.name`, after refusing a key of another strategy that is set (a node
    validated by schema.validate holds only its own; tests and scripts pass others)."""
    from kdmtl_cli.plugins import load_builtin

    load_builtin()
    name = getattr(cfg, "name", "equal")
    cls = WEIGHTINGS.get(name)
    settings = WEIGHTINGS.settings(name)
    uses = [f.name for f in dataclasses.fields(settings)] if settings is not None else []
    declared = [f.name for other in WEIGHTINGS.names() if WEIGHTINGS.settings(other)
                for f in dataclasses.fields(WEIGHTINGS.settings(other))]
    for key in declared:
        if key not in uses and hasattr(cfg, key) and not _is_default(getattr(cfg, key), settings_default(key)):
            listed = ", ".join(f"weighting.{u}" for u in uses) or "no other setting"
            raise KdmtlError(f"weighting.{key} is not used by {name} (it uses: {listed}); remove it")
    return cls(cfg, list(task_names), seed)


# -- the training step ---------------------------------------------------------------------

@dataclass
class StepResult:
    total: Tensor                              # detached: the loss the step minimised
    weights: dict[str, Tensor]                 # detached 0-dim tensors
    grad_norms: dict[str, Tensor] | None       # ||d loss_k / d shared||, unscaled; None if not measured


def _flat_grad(output: Tensor, params: list[Tensor], scale: float, retain: bool = True) -> Tensor:
    """d(output)/d(params) flattened to [P], unscaled. Backpropagating ``output * scale`` (not
    ``output``) keeps mixed precision's protection against underflow; unused params give zeros."""
    if not params:
        return output.new_zeros(0).detach()
    if not output.requires_grad:
        return torch.cat([torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for p in params])
    grads = torch.autograd.grad(output * scale if scale != 1.0 else output, params,
                                retain_graph=retain, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    return flat / scale if scale != 1.0 else flat


def _accumulate(params: list[Tensor], flat: Tensor) -> None:
    """Add the flat [P] vector into the params' .grad, one slice per parameter."""
    offset = 0
    for p in params:
        piece = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.add_(piece)


def weighted_backward(weighting: Weighting, losses: dict[str, Tensor], extra: Tensor | None,
                      shared: list[torch.nn.Parameter], others: list[torch.nn.Parameter],
                      scale: float = 1.0, measure_grad_norms: bool = False) -> StepResult:
    """Write this step's gradients (times ``scale``) into ``.grad``; see the module docstring.

    ``extra``: terms that belong to no task (feature distillation), added unweighted; for a
    gradient-based strategy its trunk gradient is added to the direction unmodified."""
    names = weighting.task_names
    shared = [p for p in shared if p.requires_grad]
    others = [p for p in others if p.requires_grad]

    if not weighting.gradient_based:
        norms = None
        if measure_grad_norms and shared:
            # autograd.grad leaves .grad alone, so measuring never changes the step itself
            norms = {t: _flat_grad(losses[t], shared, scale).norm() for t in names}
        total, weights = weighting.combine(losses)
        if extra is not None:
            total = total + extra
        if total.requires_grad:
            (total * scale if scale != 1.0 else total).backward()
        return StepResult(total.detach(), weights, norms)

    grads = torch.stack([_flat_grad(losses[t], shared, scale) for t in names])  # [K, P]
    direction, weights = weighting.combine_grads(grads, {t: losses[t].detach() for t in names})
    direction = direction.to(grads.dtype)
    if extra is not None:
        direction = direction + _flat_grad(extra, shared, scale)
    _accumulate(shared, direction * scale if scale != 1.0 else direction)
    if scale != 1.0:
        # gradients combine_grads wrote into the strategy's own parameters (GradNorm's logits,
        # trained by the model optimiser) are unscaled: scale them like every other .grad
        for p in weighting.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)

    heads = weighting.head_weights(weights)
    total = sum(heads[t].to(losses[t].dtype) * losses[t] for t in names)
    if extra is not None:
        total = total + extra
    if others and total.requires_grad:
        # only the task-specific parameters: the trunk's gradient was written above
        torch.autograd.backward(total * scale if scale != 1.0 else total, inputs=others)
    norms = grads.norm(dim=1)
    return StepResult(total.detach(), weights, {t: norms[k] for k, t in enumerate(names)})
