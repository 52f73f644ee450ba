"""torchvision and timm backbones as trunks (kdmtl_cli/models/torchvision_resnet.py, timm_trunk.py):
declared channels / strides match the maps, local weights files reproduce the source model's
features exactly, wrong files are one-line errors, nothing is downloaded; the conf/ options."""

from __future__ import annotations

import dataclasses
import socket
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from safetensors.torch import save_file

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import TRUNKS
from kdmtl_cli.models import timm_trunk  # noqa: F401  (registers arch timm)
from kdmtl_cli.models import torchvision_resnet as tv

REPO = Path(__file__).resolve().parents[1]
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

pytestmark = pytest.mark.usefixtures("one_thread")

# One small instance per torchvision family: the module paths feature KD addresses, and the
# torchvision model's own deepest feature output.
FAMILIES = {
    "resnet18": (["stem", "layer1", "layer3"],
                 lambda m, x: m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))),
    "mobilenet_v3_small": (["features.1", "features.12"], lambda m, x: m.features(x)),
    "efficientnet_b0": (["features.2", "features.8"], lambda m, x: m.features(x)),
    "convnext_tiny": (["features.0.0", "features.5"], lambda m, x: m.features(x)),
    "regnet_x_400mf": (["stem", "trunk_output.block3"], lambda m, x: m.trunk_output(m.stem(x))),
}


def _cfg(arch, **settings):
    return OmegaConf.create({"student": {"arch": arch, "decoder_width": 8, **settings}}).student


def _image(seed=0):
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _check_maps(trunk, x):
    """forward gives one map per declared channel count, each at its declared stride."""
    with torch.no_grad():
        maps = trunk.eval()(x)
    assert len(maps) == len(trunk.channels) == len(trunk.reductions)
    for fmap, channels, stride in zip(maps, trunk.channels, trunk.reductions):
        assert fmap.shape == (x.shape[0], channels, x.shape[2] // stride, x.shape[3] // stride)
    assert trunk.reductions == sorted(trunk.reductions)    # finest first
    return maps


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: nothing may be downloaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*_args, **_kwargs):
        raise AssertionError("a backbone tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---- registry and settings ----------------------------------------------------------------------

def test_backbones_are_registered_with_their_settings():
    for arch in (*tv.RESNETS, *tv.FEATURE_NETS, *tv.REGNETS):
        assert arch in TRUNKS and TRUNKS.settings(arch) is tv.TorchvisionSettings
        assert callable(getattr(torchvision.models, arch))       # a real torchvision builder
    assert TRUNKS.settings("timm") is timm_trunk.TimmSettings
    # fields of one name across trunks are merged into one schema: same type and default
    fields = {}
    for settings in (tv.TorchvisionSettings, timm_trunk.TimmSettings):
        for f in dataclasses.fields(settings):
            fields.setdefault(f.name, set()).add((str(f.type), repr(f.default), f.metadata.get("init_only", False)))
    assert all(len(kinds) == 1 for kinds in fields.values()), fields
    assert fields["weights"] == {("Optional[str]", "None", True)}    # not remembered in checkpoints
    assert {f.name: f.default for f in dataclasses.fields(tv.TorchvisionSettings)} == \
        {"weights": None, "small_input": True}
    assert {f.name: f.default for f in dataclasses.fields(timm_trunk.TimmSettings)} == \
        {"timm_name": "resnet18", "weights": None}


# ---- torchvision: shapes, strides, module paths --------------------------------------------------

@pytest.mark.parametrize("arch", FAMILIES)
def test_small_input_trunk_maps_match_declared_channels_and_strides(arch):
    torch.manual_seed(0)
    trunk = TRUNKS.get(arch)(_cfg(arch, weights=None, small_input=True))
    maps = _check_maps(trunk, _image())
    assert len(maps) == 4 and trunk.input_norm is None
    # the stem no longer downsamples: ResNets 1/2/4/8, ConvNeXt 1/2/4/8, the others 2/4/8/16
    assert trunk.reductions == ([2, 4, 8, 16] if arch in ("mobilenet_v3_small", "efficientnet_b0",
                                                          "regnet_x_400mf") else [1, 2, 4, 8])
    modules = dict(trunk.named_modules())
    for path in FAMILIES[arch][0]:
        assert path in modules, f"no trunk.{path}"


# ---- torchvision: local weights files ---------------------------------------------------------------

@pytest.mark.parametrize("arch, ext", [("resnet18", "pth"), ("mobilenet_v3_small", "safetensors"),
                                       ("efficientnet_b0", "pt"), ("convnext_tiny", "pth"),
                                       ("regnet_x_400mf", "pth")])
def test_weights_file_reproduces_the_torchvision_features(arch, ext, tmp_path):
    torch.manual_seed(1)
    net = getattr(torchvision.models, arch)(weights=None).eval()
    path = tmp_path / f"{arch}.{ext}"
    if ext == "safetensors":
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    else:
        torch.save(net.state_dict(), path)
    x = _image(2)
    with torch.no_grad():
        expected = FAMILIES[arch][1](net, x)
    torch.manual_seed(7)             # another init: equality means the file was loaded
    trunk = TRUNKS.get(arch)(_cfg(arch, weights=str(path), small_input=False))
    maps = _check_maps(trunk, x)
    assert trunk.reductions == [4, 8, 16, 32]
    assert torch.equal(maps[-1], expected)
    assert trunk.input_norm == IMAGENET


def test_small_input_keeps_the_stem_weights_of_the_file(tmp_path):
    # ConvNeXt: the 4x4 stride-4 patchify conv runs at stride 1 with "same" padding, its weights kept
    torch.manual_seed(1)
    net = torchvision.models.convnext_tiny(weights=None)
    torch.save(net.state_dict(), tmp_path / "convnext.pth")
    trunk = TRUNKS.get("convnext_tiny")(_cfg("convnext_tiny", weights=str(tmp_path / "convnext.pth"),
                                              small_input=True))
    stem = trunk.features[0][0]
    assert stem.stride == (1, 1) and torch.equal(stem.weight, net.features[0][0].weight)
    assert torch.equal(trunk.features[7][2].block[0].weight, net.features[7][2].block[0].weight)
    _check_maps(trunk, _image()[:1, :, :32, :32])


def test_classifier_of_another_size_is_ignored(tmp_path):
    torch.manual_seed(1)
    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    torch.save(net.state_dict(), tmp_path / "ten_classes.pth")
    trunk = TRUNKS.get("mobilenet_v3_small")(_cfg("mobilenet_v3_small", weights=str(tmp_path / "ten_classes.pth"),
                                                   small_input=False))
    x = _image(3)
    with torch.no_grad():
        assert torch.equal(_check_maps(trunk, x)[-1], net.features(x))


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_mismatched_weights_file_is_a_one_line_error(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(KdmtlError) as excinfo:
        TRUNKS.get("resnet18")(_cfg("resnet18", weights=str(tmp_path / "resnet50.pth"), small_input=False))
    line = _one_line_error(excinfo)
    assert str(tmp_path / "resnet50.pth") in line and "does not match torchvision resnet18" in line
    assert "unexpected keys (e.g. layer1.0.conv3.weight" in line and "layer1.0.conv1.weight [64, 64, 1, 1] vs [64, 64, 3, 3]" in line

    # another family's file, with its keys named
    torch.save({"features.0.0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(KdmtlError) as excinfo:
        TRUNKS.get("regnet_x_400mf")(_cfg("regnet_x_400mf", weights=str(tmp_path / "bad.pt")))
    line = _one_line_error(excinfo)
    assert "missing keys (e.g. stem.0.weight" in line and "unexpected keys (e.g. features.0.0.weight)" in line

    (tmp_path / "text.pth").write_text("not a torch file")
    with pytest.raises(KdmtlError) as excinfo:
        TRUNKS.get("mobilenet_v3_small")(_cfg("mobilenet_v3_small", weights=str(tmp_path / "text.pth")))
    assert "text.pth" in _one_line_error(excinfo)
    with pytest.raises(KdmtlError, match="not found"):
        TRUNKS.get("efficientnet_b0")(_cfg("efficientnet_b0", weights=str(tmp_path / "none.pth")))


# ---- timm -------------------------------------------------------------------------------------------------

def test_timm_trunk_loads_a_local_state_dict_offline(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    net = timm.create_model("resnet18", pretrained=False).eval()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    x = _image(4)
    with torch.no_grad():
        expected = net.forward_features(x)
    for name in ("r18.pth", "r18.safetensors"):
        torch.manual_seed(7)
        trunk = TRUNKS.get("timm")(_cfg("timm", timm_name="resnet18", weights=str(tmp_path / name)))
        maps = _check_maps(trunk, x)
        assert trunk.channels == [64, 128, 256, 512] and trunk.reductions == [4, 8, 16, 32]
        assert torch.equal(maps[-1], expected)
        assert trunk.input_norm.keys() == IMAGENET.keys() and "layer3" in dict(trunk.body.named_modules())
        for key, values in IMAGENET.items():     # pytest >= 9.2's approx takes no nested mapping
            assert trunk.input_norm[key] == pytest.approx(values)

    torch.manual_seed(7)
    plain = TRUNKS.get("timm")(_cfg("timm", timm_name="resnet18", weights=None))
    assert plain.input_norm is None and not torch.equal(_check_maps(plain, x)[-1], expected)


def test_timm_wrong_weights_or_name_is_a_one_line_error(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(KdmtlError) as excinfo:
        TRUNKS.get("timm")(_cfg("timm", timm_name="resnet18", weights=str(tmp_path / "partial.pth")))
    line = _one_line_error(excinfo)
    assert str(tmp_path / "partial.pth") in line and "does not match timm resnet18" in line
    assert "layer4.1.bn2.weight" in line and "extra.weight" in line

    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "mnv3.pth")
    with pytest.raises(KdmtlError) as excinfo:
        TRUNKS.get("timm")(_cfg("timm", timm_name="resnet18", weights=str(tmp_path / "mnv3.pth")))
    assert "does not match timm resnet18" in _one_line_error(excinfo)

    with pytest.raises(KdmtlError) as excinfo:
        TRUNKS.get("timm")(_cfg("timm", timm_name="resnet_18x", weights=None))
    assert "student.timm_name='resnet_18x' is not a timm model" in _one_line_error(excinfo)


def test_timm_missing_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)      # import timm -> ImportError
    teacher = OmegaConf.create({"teacher": {"arch": "timm", "timm_name": "resnet18"}}).teacher
    with pytest.raises(KdmtlError) as excinfo:
        TRUNKS.get("timm")(teacher)
    assert _one_line_error(excinfo) == "teacher.arch=timm needs timm: pip install 'kdmtl[timm]'"
    with pytest.raises(KdmtlError, match=r"^student\.arch=timm needs timm"):
        TRUNKS.get("timm")(_cfg("timm"))


# ---- conf/ options ------------------------------------------------------------------------------------

COMMON = {"arch", "decoder_width"}


@pytest.mark.parametrize("group", ["student", "teacher"])
@pytest.mark.parametrize("option", ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0",
                                    "convnext_tiny", "regnet_y_400mf", "timm"])
def test_backbone_options_name_a_trunk_and_only_its_keys(group, option):
    path = REPO / "conf" / group / f"{option}.yaml"
    node = OmegaConf.to_container(OmegaConf.load(path))
    if group == "teacher":
        assert node.pop("defaults") == ["multitask", "_self_"]
    settings = TRUNKS.settings(node["arch"])
    assert set(node) <= COMMON | {f.name for f in dataclasses.fields(settings)}
    for line in path.read_text().splitlines():     # every key is commented
        if line and not line.startswith(("#", " ", "defaults:")):
            assert "#" in line, f"{path.name}: no comment on {line!r}"
