"""Optimisers and per-step learning-rate schedules from the `optim` config group."""

from __future__ import annotations

import math

import torch

from kdmtl_cli.errors import KdmtlError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "step", "multistep", "constant")


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise KdmtlError(f"unknown {key} '{value}'; choose one of: {', '.join(choices)}")


def check_optimizer(cfg) -> None:
    if cfg.lr <= 0:
        raise KdmtlError(f"optim.lr must be > 0 (got {cfg.lr})")
    _check_choice("optim.name", cfg.name, OPTIMIZERS)
    _check_choice("optim.scheduler", cfg.scheduler, SCHEDULERS)


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """`params`: parameters, or param groups (a group may set its own lr, e.g. KD4MTL adaptors)."""
    check_optimizer(cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    adam = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer, cfg, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per batch: linear warm-up, then cosine to zero / step decay / decay at
    milestone epochs (x gamma once each epoch index >= a milestone: RepDistiller's 150/180/210
    decay from epoch 151 on, counting from 1) / constant."""
    _check_choice("optim.scheduler", cfg.scheduler, SCHEDULERS)
    if cfg.epochs < 1:
        raise KdmtlError(f"optim.epochs must be at least 1 (got {cfg.epochs})")
    milestones = sorted(cfg.milestones or [])
    if cfg.scheduler == "multistep" and not milestones:
        raise KdmtlError("optim.scheduler=multistep needs optim.milestones, e.g. optim.milestones=[150,180,210]")
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.scheduler == "step":
            return cfg.gamma ** ((step // steps_per_epoch) // max(1, cfg.step_epochs))
        if cfg.scheduler == "multistep":
            return cfg.gamma ** sum(step // steps_per_epoch >= m for m in milestones)
        return 1.0

    # A param group with "scheduled": False keeps its own lr (KD4MTL's adaptors: the official code
    # steps them with their own optimiser and no schedule).
    factors = [factor if group.get("scheduled", True) else (lambda step: 1.0) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
