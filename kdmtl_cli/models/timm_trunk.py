"""timm backbones as multi-task trunks (`arch: timm`, the model named by `timm_name`).

Built with `timm.create_model(timm_name, pretrained=False, features_only=True)`: nothing is ever
downloaded. The trunk returns the feature maps of timm's `feature_info` of stride >= 4, finest
first (the stride-2 stem map most CNNs also give is dropped, as for the torchvision trunks);
`channels` and `reductions` come from `feature_info`. The timm feature model is `trunk.body`, so
feature distillation addresses its modules as timm names them in features_only mode, e.g.
`trunk.body.layer3` (resnet18), `trunk.body.blocks.4` (efficientnet_b0),
`trunk.body.stages_2` (convnext_tiny; nested names get "_" instead of ".").

`weights=PATH`: a local file with the state dict of timm's full classification model, as saved by
`torch.save(timm.create_model(timm_name).state_dict())` (or .safetensors). It is first checked
against that model (classifier keys, the pretrained config's `classifier`, aside): a missing,
unexpected or mis-shaped key is a one-line KdmtlError naming the file and the first keys. It is
then loaded through timm's own pretrained path (`pretrained=True` with
`pretrained_cfg_overlay=dict(file=PATH, source="", hf_hub_id=None, url=None)`: timm reads the file
with weights_only / safetensors, applies the model's checkpoint filter and adapts it to the
features model; the hub and URLs are never consulted). With weights, `input_norm` is the mean/std
of the model's pretrained config; without, None.

There is no `small_input` for timm trunks: the model keeps its own stem (for small images pick a
model whose stem suits them, or upscale the images).
timm is imported only when a timm trunk is built; without it: "student.arch=timm needs timm:
pip install 'kdmtl[timm]'".
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from kdmtl_cli.engine.checkpoint import load_tensor_file, one_line_err
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import TRUNKS, init_only
from kdmtl_cli.models.torchvision_resnet import CLASSIFIER_PREFIXES, check_state_dict, unwrap_state_dict


@dataclass
class TimmSettings:
    """The `student.*` / `teacher.*` keys the timm trunk reads (besides arch, decoder_width, head)."""
    timm_name: str = "resnet18"        # timm model name (timm.list_models()), built features_only, never downloaded
    # local weights file: timm's full-model state dict (.pth/.pt, or .safetensors). init_only: not
    # remembered in checkpoints (they hold the weights)
    weights: Optional[str] = init_only(None)


def _config_key(cfg) -> str:
    """'student' or 'teacher': the config node `cfg` is (for error messages)."""
    try:
        key = cfg._key()
    except Exception:  # noqa: BLE001 - not an OmegaConf node
        key = None
    return key if key in ("student", "teacher") else "student"


def _import_timm(key: str = "student"):
    try:
        import timm
    except ImportError:
        raise KdmtlError(f"{key}.arch=timm needs timm: pip install 'kdmtl[timm]'") from None
    return timm


@contextlib.contextmanager
def _quiet_timm():
    """timm logs the (expected) classifier keys it drops while adapting weights to a features model."""
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class TimmTrunk(nn.Module):
    def __init__(self, timm_name: str, weights: Optional[str] = None, key: str = "student"):
        super().__init__()
        timm = _import_timm(key)
        if not timm.is_model(timm_name):
            close = timm.list_models(f"*{timm_name}*")[:5]
            raise KdmtlError(f"{key}.timm_name={timm_name!r} is not a timm model"
                             + (f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"))
        kwargs = {}
        path = None
        if weights:
            path = Path(weights).expanduser()
            self._check_weights(timm, timm_name, path)
            kwargs["pretrained_cfg_overlay"] = dict(file=str(path), source="", hf_hub_id=None, url=None)
        try:
            with _quiet_timm():
                body = timm.create_model(timm_name, pretrained=path is not None, features_only=True, **kwargs)
        except KdmtlError:
            raise
        except Exception as err:  # noqa: BLE001 - timm raises many types (no features_only support, load errors)
            what = f"with weights {path}" if path is not None else "with features_only=True"
            raise KdmtlError(f"{key}.timm_name={timm_name!r}: timm cannot build it {what} "
                             f"({one_line_err(err)})") from None
        self.body = body
        info = body.feature_info
        channels, reductions = list(info.channels()), list(info.reduction())
        keep = [i for i, r in enumerate(reductions) if r >= 4] or list(range(len(reductions)))
        self._keep = tuple(keep)
        self._nhwc = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")
        self.channels = [channels[i] for i in keep]
        self.reductions = [reductions[i] for i in keep]
        self.timm_name = timm_name
        cfg = getattr(body, "pretrained_cfg", None) or {}
        self.input_norm = ({"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}
                           if path is not None and cfg.get("mean") and cfg.get("std") else None)

    @staticmethod
    def _check_weights(timm, timm_name: str, path: Path) -> None:
        """The file holds the full classification model's state dict (classifier aside), checked
        against the model built on the meta device (no memory, no init cost)."""
        state = unwrap_state_dict(load_tensor_file(path, what=f"timm {timm_name} weights file"))
        try:
            with torch.device("meta"):
                full = timm.create_model(timm_name, pretrained=False)
        except Exception:  # noqa: BLE001 - a model whose init does not run on meta tensors
            full = timm.create_model(timm_name, pretrained=False)
        classifiers = (getattr(full, "pretrained_cfg", None) or {}).get("classifier") or ()
        if isinstance(classifiers, str):
            classifiers = (classifiers,)
        ignore = (*CLASSIFIER_PREFIXES, *(f"{name}." for name in classifiers))
        check_state_dict(state, full.state_dict(), path, f"timm {timm_name}", ignore,
                         source=f"timm.create_model({timm_name!r})")

    def forward(self, x):
        features = self.body(x)
        features = [features[i] for i in self._keep]
        if self._nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return features


def weights_norm(cfg):
    """The mean/std of `timm_name`'s pretrained config when a weights file is given (timm's table;
    nothing is built or read), for the run's input normalisation (kdmtl_cli/run.py)."""
    if not getattr(cfg, "weights", None):
        return None
    try:
        import timm
    except ImportError:
        return None
    pretrained = timm.models.get_pretrained_cfg(str(cfg.timm_name))
    if pretrained is None or not pretrained.mean or not pretrained.std:
        return None
    return {"mean": [float(v) for v in pretrained.mean], "std": [float(v) for v in pretrained.std]}


@TRUNKS.register("timm", settings=TimmSettings, input_norm=weights_norm)
def build(cfg):
    key = _config_key(cfg)
    return TimmTrunk(getattr(cfg, "timm_name", "resnet18"), getattr(cfg, "weights", None), key=key)
