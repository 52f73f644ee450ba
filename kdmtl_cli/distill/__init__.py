"""Distillation methods by name. A method maps (student outputs, teacher outputs, batch)
to named loss terms such as ``kd/cls``; the trainer never knows which method runs."""

from __future__ import annotations

from kdmtl_cli.registry import Registry

KD_METHODS: Registry = Registry("loss", "loss.name")


def build_method(loss_cfg, tasks):
    from kdmtl_cli.distill import logit  # noqa: F401  (register methods)

    return KD_METHODS.get(loss_cfg.name)(loss_cfg, tasks)
