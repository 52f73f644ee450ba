"""Models: trunks by name (convnet, torchvision ResNets), task heads, the multi-task network."""

from __future__ import annotations

from typing import Dict

from kdmtl_cli.registry import Registry

TRUNKS: Registry = Registry("architecture", "student.arch / teacher.arch")


def build_model(model_cfg, tasks: Dict[str, "object"]):
    from kdmtl_cli.models import convnet, torchvision_resnet  # noqa: F401  (register trunks)
    from kdmtl_cli.models import (cifar_mobilenet, cifar_resnet, cifar_shufflenet,  # noqa: F401  (CIFAR zoo)
                                  cifar_vgg, cifar_wrn)
    from kdmtl_cli.models import segnet  # noqa: F401  (MTAN / KD4MTL SegNet)
    from kdmtl_cli.models.multitask import MultiTaskModel

    head = getattr(model_cfg, "head", None) or "auto"
    if head not in ("auto", "mtan"):
        from kdmtl_cli.errors import KdmtlError
        raise KdmtlError(f"model head must be 'auto' or 'mtan' (got {head!r})")
    if head == "mtan" and model_cfg.arch not in ("segnet", "segnet_mtan"):
        from kdmtl_cli.errors import KdmtlError
        raise KdmtlError(f"head: mtan is MTAN's SegNet prediction layer: arch segnet or segnet_mtan "
                         f"(got arch {model_cfg.arch!r}); use head: auto")
    trunk = TRUNKS.get(model_cfg.arch)(model_cfg)
    return MultiTaskModel(trunk, tasks, decoder_width=model_cfg.decoder_width)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
