"""The MTAN / KD4MTL SegNet trunk: shapes as a multi-task model and the paper-size parameter count."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from kdmtl_cli.data import TargetSpec
from kdmtl_cli.models import build_model, count_parameters
from kdmtl_cli.models.segnet import SegNetTrunk
from kdmtl_cli.schema import ModelConfig
from kdmtl_cli.tasks import build_tasks


def _conv_bn(c_in, c_out):
    return 9 * c_in * c_out + c_out + 2 * c_out  # 3x3 conv weight + bias, BN weight + bias


# The paper's plan, written out conv by conv (c_in, c_out).
ENCODER = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
DECODER = [(512, 512), (512, 512), (512, 512), (512, 256), (256, 256), (256, 256),
           (256, 128), (128, 128), (128, 128), (128, 64), (64, 64), (64, 64), (64, 64)]


def test_segnet_paper_size_parameter_count():
    trunk = SegNetTrunk(64)
    encoder = sum(count_parameters(trunk.stages[i]) for i in range(5))
    decoder = sum(count_parameters(trunk.stages[i]) for i in range(5, 10))
    assert encoder == sum(_conv_bn(*c) for c in ENCODER)
    # VGG16's 13 conv layers hold 14,714,688 parameters (138,357,544 in all minus the three FC
    # layers' 123,642,856; Simonyan & Zisserman 2015 / torchvision vgg16); BN adds 2 per channel.
    assert encoder == 14_714_688 + 2 * (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512)
    assert decoder == sum(_conv_bn(*c) for c in DECODER)
    # by hand: encoder 14,723,136; decoder 3 x 2,360,832 (512->512) + 1,180,416 (512->256)
    # + 2 x 590,592 + 295,296 + 2 x 147,840 + 73,920 + 3 x 37,056 = 10,220,160
    assert encoder == 14_723_136 and decoder == 10_220_160
    assert count_parameters(trunk) == encoder + decoder == 24_943_296
    assert [m.out_channels for m in trunk.modules() if isinstance(m, torch.nn.Conv2d)] == \
        [c for _, c in ENCODER + DECODER]


def test_segnet_multitask_shapes_and_stage_paths():
    targets = {"seg": TargetSpec("segmentation", 13), "depth": TargetSpec("depth", mean=2.0, std=1.0),
               "normal": TargetSpec("normals")}
    tasks = build_tasks(OmegaConf.create({"seg": {"kind": "segmentation"}, "depth": {"kind": "depth"},
                                          "normal": {"kind": "normals"}}), targets)
    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(ModelConfig(arch="segnet", width=4, decoder_width=4)), tasks)
    assert model.trunk.channels == [4, 32] and model.trunk.reductions == [1, 32]
    model.capture_features([f"trunk.stages.{i}" for i in range(10)])
    x = torch.randn(2, 3, 32, 48)
    out = model(x)
    assert {n: tuple(v.shape) for n, v in out["outputs"].items()} == {
        "seg": (2, 13, 32, 48), "depth": (2, 1, 32, 48), "normal": (2, 3, 32, 48)}
    feats = model.trunk(x)
    assert [tuple(f.shape) for f in feats] == [(2, 4, 32, 48), (2, 32, 1, 1)]
    shapes = {k: tuple(v.shape[1:]) for k, v in out["features"].items()}
    assert shapes["trunk.stages.0"] == (4, 32, 48) and shapes["trunk.stages.4"] == (32, 2, 3)
    assert shapes["trunk.stages.5"] == (32, 2, 3) and shapes["trunk.stages.9"] == (4, 32, 48)
    out["outputs"]["seg"].sum().backward()


def _nyuv2_tasks():
    targets = {"seg": TargetSpec("segmentation", 13), "depth": TargetSpec("depth", mean=2.0, std=1.0),
               "normal": TargetSpec("normals")}
    return build_tasks(OmegaConf.create({"seg": {"kind": "segmentation"}, "depth": {"kind": "depth"},
                                         "normal": {"kind": "normals"}}), targets)


def test_mtan_paper_size_parameter_count():
    """MTAN's NYUv2 script prints 44,229,076 parameters, three of them its uncertainty
    log-variances (kdmtl keeps those in the weighting, not the model)."""
    model = build_model(OmegaConf.structured(ModelConfig(arch="segnet_mtan", width=64)), _nyuv2_tasks())
    assert count_parameters(model) == 44_229_076 - 3
    # the trunk is plain SegNet plus the task-shared attention convs
    assert count_parameters(model.trunk) - count_parameters(model.trunk.attention) == 24_943_296


def test_mtan_with_open_masks_predicts_from_the_trunk_output():
    """With every decoder mask forced to 1 (last BN: weight 0, bias 30, sigmoid -> 1) a dense task's
    branch output is exactly the trunk's last decoder stage, so the prediction is MTAN's
    prediction layer applied to it; odd input sizes keep their size."""
    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(ModelConfig(arch="segnet_mtan", width=4)), _nyuv2_tasks()).eval()
    head = model.heads["seg"]
    for layer in head.decoder:
        torch.nn.init.zeros_(layer[4].weight)
        torch.nn.init.constant_(layer[4].bias, 30.0)
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        out = model(x)["outputs"]
        trunk_out = model.trunk(x)[0]
        assert torch.allclose(out["seg"], head.predict(trunk_out), atol=1e-5)
    assert {n: tuple(v.shape) for n, v in out.items()} == {
        "seg": (2, 13, 33, 47), "depth": (2, 1, 33, 47), "normal": (2, 3, 33, 47)}
    # masks that are not open change the prediction: the attention is really in the path
    assert not torch.allclose(out["depth"], model.heads["depth"].head.predict(trunk_out) * 1.0 + 2.0, atol=1e-3)


def test_mtan_shared_attention_convs_learn_from_every_task():
    tasks = _nyuv2_tasks()
    model = build_model(OmegaConf.structured(ModelConfig(arch="segnet_mtan", width=4)), tasks)
    out = model(torch.randn(2, 3, 32, 32))["outputs"]
    for name in tasks:
        model.zero_grad()
        out[name].square().mean().backward(retain_graph=True)
        assert model.trunk.attention.encoder[0][0].weight.grad.abs().sum() > 0
        others = [n for n in tasks if n != name]
        assert all(p.grad is None or p.grad.abs().sum() == 0 for n in others for p in model.heads[n].parameters())
