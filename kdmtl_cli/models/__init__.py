"""Models: trunks by name (TRUNKS; one file each in this folder, or a user's plug-in file), task
heads, the multi-task network; a user's own trunk or whole model named by import path.

The trunk contract (kdmtl_cli/models/trunk.py): forward(image) returns the feature maps, a list
ordered finest first / deepest last; `channels` and `reductions` say each map's channels and
stride (measured by one forward at 64 px when a trunk does not say). MultiTaskModel attaches the
task heads. A whole model (`student.model`) returns {task: output} itself.
"""

from __future__ import annotations

import dataclasses
from typing import Dict

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.registry import Registry

TRUNKS: Registry = Registry("architecture", "student.arch / teacher.arch")


def init_only(default=None, **kwargs):
    """A trunk setting used to build the trunk but not remembered in checkpoints (a weights file:
    the checkpoint holds the weights)."""
    return dataclasses.field(default=default, metadata={"init_only": True, **kwargs})


def instantiate(node, key: str, *, from_checkpoint: bool = False):
    """`{_target_: import.path, arg: value...}` -> the module it builds (plugins.resolve_target
    says what a config or a checkpoint may name). Arguments are plain values."""
    from omegaconf import DictConfig, OmegaConf

    from kdmtl_cli.plugins import resolve_target

    args = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if not isinstance(args, dict):
        raise KdmtlError(f"{key} must be a mapping {{_target_: import.path, arg: value...}} (got {type(args).__name__})")
    args = dict(args)
    target = args.pop("_target_", None)
    if target is None:
        raise KdmtlError(f"{key} needs a _target_: the import path of a torch.nn.Module class "
                         f"(e.g. {key}._target_=my_trunks.UNet)")
    nested = [k for k, v in args.items() if isinstance(v, dict) and "_target_" in v]
    if nested:
        raise KdmtlError(f"{key}.{nested[0]} has a _target_ of its own; build it inside your class instead")
    factory = resolve_target(target, f"{key}._target_", from_checkpoint=from_checkpoint)
    try:
        return factory(**args)
    except TypeError as err:
        raise KdmtlError(f"{key}: {target}(**{args}) failed: {err}") from None


def _measure_maps(trunk, key: str) -> None:
    """Set `channels` / `reductions` of a trunk that does not declare them, by one forward of a
    64 x 64 batch (eval mode, no gradient; the trunk's mode is restored)."""
    import torch

    if hasattr(trunk, "channels") and hasattr(trunk, "reductions"):
        return
    was_training = trunk.training
    trunk.eval()
    try:
        with torch.no_grad():
            maps = trunk(torch.zeros(2, 3, 64, 64))
    finally:
        trunk.train(was_training)
    if not isinstance(maps, (list, tuple)) or not maps or any(
            not isinstance(m, torch.Tensor) or m.dim() != 4 for m in maps):
        got = f"a tensor of shape {list(maps.shape)}" if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise KdmtlError(f"{key}: a trunk's forward must return its feature maps, a list of [N,C,H,W] tensors "
                         f"(deepest last); got {got} (a torchvision classifier as a trunk: student.arch=resnet50 ...)")
    trunk.channels = [int(m.shape[1]) for m in maps]
    trunk.reductions = [max(1, 64 // int(m.shape[-1])) for m in maps]


def build_model(model_cfg, tasks: Dict[str, "object"], *, from_checkpoint: bool = False, key: str = "student"):
    """The network of `model_cfg` (a student / teacher node, or a checkpoint's remembered
    settings with `from_checkpoint`) with one head per task."""
    from kdmtl_cli.models.multitask import MultiTaskModel, WholeModel
    from kdmtl_cli.plugins import load_builtin

    load_builtin()
    whole, trunk_node = getattr(model_cfg, "model", None), getattr(model_cfg, "trunk", None)
    if whole:
        return WholeModel(instantiate(whole, f"{key}.model", from_checkpoint=from_checkpoint), tasks)
    if trunk_node:
        trunk = instantiate(trunk_node, f"{key}.trunk", from_checkpoint=from_checkpoint)
        _measure_maps(trunk, f"{key}.trunk")
    else:
        trunk = TRUNKS.get(model_cfg.arch)(model_cfg)
    return MultiTaskModel(trunk, tasks, decoder_width=model_cfg.decoder_width)


def remembered_settings(model_cfg) -> Dict:
    """What a checkpoint remembers of a student / teacher node to rebuild its network: the common
    keys and the trunk's settings, except `init_only` ones (a weights file)."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(model_cfg, resolve=True)
    from kdmtl_cli.schema import ModelCommon

    keys = [f.name for f in dataclasses.fields(ModelCommon)]
    settings = TRUNKS.settings(container["arch"]) if not (container.get("trunk") or container.get("model")) \
        and container["arch"] in TRUNKS else None
    for f in dataclasses.fields(settings) if settings is not None else ():
        if not f.metadata.get("init_only"):
            keys.append(f.name)
    return {k: container[k] for k in keys if k in container}


def without_init_only(model_cfg):
    """A copy of a student / teacher node with its trunk's `init_only` settings at their defaults:
    for a skeleton built only to see the shapes (no weights file read)."""
    from omegaconf import OmegaConf

    settings = TRUNKS.settings(model_cfg.arch) if model_cfg.arch in TRUNKS else None
    reset = {f.name: f.default for f in dataclasses.fields(settings) if f.metadata.get("init_only")} \
        if settings is not None and not (getattr(model_cfg, "trunk", None) or getattr(model_cfg, "model", None)) \
        else {}
    return OmegaConf.merge(model_cfg, reset) if reset else model_cfg


def weights_norm(model_cfg):
    """The input normalisation ({mean, std}) the weights file of a student / teacher node expects
    (its trunk's `input_norm` trait: ImageNet's for torchvision weights), or None."""
    if getattr(model_cfg, "trunk", None) or getattr(model_cfg, "model", None) or model_cfg.arch not in TRUNKS:
        return None
    rule = TRUNKS.trait(model_cfg.arch, "input_norm", None)
    return rule(model_cfg) if rule is not None else None


def describe(model_cfg) -> str:
    """One line naming a student / teacher: `convnet width 16 depth 1 stages 3 stem_stride 2`,
    or the import path of a user's trunk / model."""
    remembered = remembered_settings(model_cfg)
    for key in ("model", "trunk"):
        if remembered.get(key):
            return f"{key} {remembered[key].get('_target_')}"
    settings = " ".join(f"{k} {v}" for k, v in remembered.items()
                        if k not in ("arch", "trunk", "model", "decoder_width") and not isinstance(v, (dict, list)))
    return f"{remembered['arch']} {settings}".strip()


def settings_from_checkpoint(remembered: Dict):
    """A model node rebuilt from a checkpoint's remembered settings: the trunk's current defaults
    for what it does not hold (a checkpoint of an older kdmtl), keys the trunk no longer reads dropped."""
    from omegaconf import OmegaConf

    from kdmtl_cli.plugins import load_builtin
    from kdmtl_cli.schema import section_schema

    load_builtin()
    remembered = dict(remembered)
    external = remembered.get("trunk") or remembered.get("model")
    arch = remembered.get("arch", "convnet")
    if not external and arch not in TRUNKS:
        TRUNKS.get(arch)   # the one-line "unknown architecture" error, with the choices
    schema = section_schema("student", None if external else arch)
    known = {f.name for f in dataclasses.fields(schema)}
    return OmegaConf.merge(OmegaConf.structured(schema), {k: v for k, v in remembered.items() if k in known})


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
