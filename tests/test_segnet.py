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


def test_segnet_mtan_head_parameter_count_is_mtans():
    """`head: mtan`: each dense task gets MTAN's prediction layer (im2im_pred/model_segnet_split.py,
    conv_layer(..., pred=True): 3x3 conv 64 -> 64, 1x1 conv 64 -> C, both with bias) on the
    trunk's decoder output; MTAN's single-task SegNet is 24,981,069 = 24,943,296 + 36,928 + 845."""
    model = build_model(OmegaConf.structured(ModelConfig(arch="segnet", width=64, head="mtan")), _nyuv2_tasks())
    trunk = sum(_conv_bn(*c) for c in ENCODER + DECODER)
    assert trunk == 24_943_296
    pred = lambda c: (9 * 64 * 64 + 64) + (64 * c + c)   # noqa: E731
    assert pred(13) == 36_928 + 845 and trunk + pred(13) == 24_981_069
    assert count_parameters(model) == trunk + pred(13) + pred(1) + pred(3) == 25_055_185
    for name, c in (("seg", 13), ("depth", 1), ("normal", 3)):
        head = getattr(model.heads[name], "head", model.heads[name])   # depth: inside ScaledHead
        assert [tuple(m.weight.shape) for m in head.modules() if isinstance(m, torch.nn.Conv2d)] == \
            [(64, 64, 3, 3), (c, 64, 1, 1)]
        assert all(m.bias is not None and not m.bias.any() for m in head.modules() if isinstance(m, torch.nn.Conv2d))


def test_segnet_mtan_head_outputs_and_conventions():
    """Small width: output shapes, depth in target units through ScaledHead, image-level tasks
    keep the pooled linear head; the default head is unchanged (DenseDecoder)."""
    from kdmtl_cli.errors import KdmtlError
    from kdmtl_cli.models.heads import DenseDecoder, PooledLinearHead, ScaledHead
    from kdmtl_cli.models.mtan import PredictionHead

    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(ModelConfig(arch="segnet", width=4, head="mtan")), _nyuv2_tasks())
    assert isinstance(model.heads["seg"], PredictionHead) and isinstance(model.heads["depth"], ScaledHead)
    assert isinstance(model.heads["depth"].head, PredictionHead)
    model.eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = model(x)["outputs"]
        raw = model.heads["depth"].head(model.trunk(x), x.shape[-2:])
    assert {n: tuple(v.shape) for n, v in out.items()} == {
        "seg": (2, 13, 32, 48), "depth": (2, 1, 32, 48), "normal": (2, 3, 32, 48)}
    assert torch.allclose(out["depth"], raw * 1.0 + 2.0)
    default = build_model(OmegaConf.structured(ModelConfig(arch="segnet", width=4, decoder_width=4)), _nyuv2_tasks())
    assert all(isinstance(getattr(h, "head", h), DenseDecoder) for h in default.heads.values())
    targets = {"label": TargetSpec("classification", 5)}
    cls = build_tasks(OmegaConf.create({"label": {"kind": "classification"}}), targets)
    model = build_model(OmegaConf.structured(ModelConfig(arch="segnet", width=4, head="mtan")), cls)
    assert isinstance(model.heads["label"], PooledLinearHead)
    import pytest
    # `head` is a setting of segnet / segnet_mtan only: set for another trunk, it is refused by name
    from kdmtl_cli.schema import narrow, train_schema

    union = OmegaConf.merge(OmegaConf.structured(train_schema()), {"student": {"arch": "convnet", "head": "mtan"}})
    with pytest.raises(KdmtlError, match="student.head is not a setting of student arch=convnet"):
        narrow(union, explicit=["student.head"])
    with pytest.raises(KdmtlError, match="head must be 'auto' or 'mtan'"):
        build_model(OmegaConf.structured(ModelConfig(arch="segnet", head="nope")), _nyuv2_tasks())


def test_mtan_with_open_masks_predicts_from_the_trunk_output():
    """With every decoder mask forced to 1 (last BN: weight 0, bias 30, sigmoid -> 1) a dense task's
    branch output is exactly the trunk's last decoder stage, so the prediction is MTAN's
    prediction layer applied to it; odd input sizes keep their size."""
    torch.manual_seed(0)
    # train-mode BN (batch statistics): with MTAN's init (zero biases) and fresh running statistics
    # a width-4 net's eval-mode activations shrink to ~1e-8 and every prediction is its bias
    model = build_model(OmegaConf.structured(ModelConfig(arch="segnet_mtan", width=4)), _nyuv2_tasks()).train()
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


# ---------------------------------------------------------------------------------------------
# Test-only reference: MTAN's SegNet (github:lorenmt/mtan @ c36c30b, im2im_pred/
# model_segnet_mtan.py class SegNet; model_segnet_single.py is the same encoder-decoder with one
# prediction layer; KD4MTL's model/segnet.py the same with three), transcribed in plain torch.
# Only `filter` is a parameter here (MTAN fixes [64, 128, 256, 512, 512]); the forward returns
# the raw prediction-layer outputs (MTAN then applies log_softmax to the first and L2-normalises
# the third, which kdmtl does in its losses / metrics).
# ---------------------------------------------------------------------------------------------
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class RefMTAN(nn.Module):
    def __init__(self, filter=(64, 128, 256, 512, 512), class_nb=13, attention=True, tasks=(13, 1, 3)):
        super().__init__()
        filter = list(filter)
        self.class_nb = class_nb
        self.encoder_block = nn.ModuleList([self.conv_layer([3, filter[0]])])
        self.decoder_block = nn.ModuleList([self.conv_layer([filter[0], filter[0]])])
        for i in range(4):
            self.encoder_block.append(self.conv_layer([filter[i], filter[i + 1]]))
            self.decoder_block.append(self.conv_layer([filter[i + 1], filter[i]]))
        self.conv_block_enc = nn.ModuleList([self.conv_layer([filter[0], filter[0]])])
        self.conv_block_dec = nn.ModuleList([self.conv_layer([filter[0], filter[0]])])
        for i in range(4):
            if i == 0:
                self.conv_block_enc.append(self.conv_layer([filter[i + 1], filter[i + 1]]))
                self.conv_block_dec.append(self.conv_layer([filter[i], filter[i]]))
            else:
                self.conv_block_enc.append(nn.Sequential(self.conv_layer([filter[i + 1], filter[i + 1]]),
                                                         self.conv_layer([filter[i + 1], filter[i + 1]])))
                self.conv_block_dec.append(nn.Sequential(self.conv_layer([filter[i], filter[i]]),
                                                         self.conv_layer([filter[i], filter[i]])))
        self.attention = attention
        if attention:
            self.encoder_att = nn.ModuleList([nn.ModuleList([self.att_layer([filter[0], filter[0], filter[0]])])])
            self.decoder_att = nn.ModuleList([nn.ModuleList([self.att_layer([2 * filter[0], filter[0], filter[0]])])])
            self.encoder_block_att = nn.ModuleList([self.conv_layer([filter[0], filter[1]])])
            self.decoder_block_att = nn.ModuleList([self.conv_layer([filter[0], filter[0]])])
            for j in range(3):
                if j < 2:
                    self.encoder_att.append(nn.ModuleList([self.att_layer([filter[0], filter[0], filter[0]])]))
                    self.decoder_att.append(nn.ModuleList([self.att_layer([2 * filter[0], filter[0], filter[0]])]))
                for i in range(4):
                    self.encoder_att[j].append(self.att_layer([2 * filter[i + 1], filter[i + 1], filter[i + 1]]))
                    self.decoder_att[j].append(self.att_layer([filter[i + 1] + filter[i], filter[i], filter[i]]))
            for i in range(4):
                if i < 3:
                    self.encoder_block_att.append(self.conv_layer([filter[i + 1], filter[i + 2]]))
                    self.decoder_block_att.append(self.conv_layer([filter[i + 1], filter[i]]))
                else:
                    self.encoder_block_att.append(self.conv_layer([filter[i + 1], filter[i + 1]]))
                    self.decoder_block_att.append(self.conv_layer([filter[i + 1], filter[i + 1]]))
        self.pred = nn.ModuleList([self.conv_layer([filter[0], n], pred=True) for n in tasks])
        self.down_sampling = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)
        self.up_sampling = nn.MaxUnpool2d(kernel_size=2, stride=2)
        if attention:
            self.logsigma = nn.Parameter(torch.FloatTensor([-0.5, -0.5, -0.5]))
        ref_mtan_init(self)

    def conv_layer(self, channel, pred=False):
        if not pred:
            return nn.Sequential(nn.Conv2d(in_channels=channel[0], out_channels=channel[1], kernel_size=3, padding=1),
                                 nn.BatchNorm2d(num_features=channel[1]), nn.ReLU(inplace=True))
        return nn.Sequential(nn.Conv2d(in_channels=channel[0], out_channels=channel[0], kernel_size=3, padding=1),
                             nn.Conv2d(in_channels=channel[0], out_channels=channel[1], kernel_size=1, padding=0))

    def att_layer(self, channel):
        return nn.Sequential(nn.Conv2d(in_channels=channel[0], out_channels=channel[1], kernel_size=1, padding=0),
                             nn.BatchNorm2d(channel[1]), nn.ReLU(inplace=True),
                             nn.Conv2d(in_channels=channel[1], out_channels=channel[2], kernel_size=1, padding=0),
                             nn.BatchNorm2d(channel[2]), nn.Sigmoid())

    def forward(self, x):
        g_encoder, g_decoder, g_maxpool, g_upsampl, indices = ([0] * 5 for _ in range(5))
        for i in range(5):
            g_encoder[i], g_decoder[-i - 1] = ([0] * 2 for _ in range(2))
        for i in range(5):
            g_encoder[i][0] = self.encoder_block[i](x if i == 0 else g_maxpool[i - 1])
            g_encoder[i][1] = self.conv_block_enc[i](g_encoder[i][0])
            g_maxpool[i], indices[i] = self.down_sampling(g_encoder[i][1])
        for i in range(5):
            g_upsampl[i] = self.up_sampling(g_maxpool[-1] if i == 0 else g_decoder[i - 1][-1], indices[-i - 1])
            g_decoder[i][0] = self.decoder_block[-i - 1](g_upsampl[i])
            g_decoder[i][1] = self.conv_block_dec[-i - 1](g_decoder[i][0])
        if not self.attention:
            return [p(g_decoder[-1][-1]) for p in self.pred]
        outs = []
        for i in range(3):
            enc = [[0] * 3 for _ in range(5)]
            dec = [[0] * 3 for _ in range(5)]
            for j in range(5):
                enc[j][0] = self.encoder_att[i][j](g_encoder[j][0] if j == 0 else
                                                   torch.cat((g_encoder[j][0], enc[j - 1][2]), dim=1))
                enc[j][1] = enc[j][0] * g_encoder[j][1]
                enc[j][2] = F.max_pool2d(self.encoder_block_att[j](enc[j][1]), kernel_size=2, stride=2)
            for j in range(5):
                dec[j][0] = F.interpolate(enc[-1][-1] if j == 0 else dec[j - 1][2], scale_factor=2, mode='bilinear',
                                          align_corners=True)
                dec[j][0] = self.decoder_block_att[-j - 1](dec[j][0])
                dec[j][1] = self.decoder_att[i][-j - 1](torch.cat((g_upsampl[j], dec[j][0]), dim=1))
                dec[j][2] = dec[j][1] * g_decoder[j][-1]
            outs.append(self.pred[i](dec[-1][-1]))
        return outs


def ref_mtan_init(net):  # model_segnet_mtan.py l. 77-86 (the same loop in every model_segnet_*.py)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.constant_(m.bias, 0)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_reference_counts_are_mtans_printed_ones():
    """MTAN's scripts print the MTAN network's count (44,229,076 with the three log-variances) and
    divide by 24,981,069, the single-task SegNet (encoder-decoder + one 13-class prediction layer)."""
    mtan = RefMTAN()
    assert _count(mtan) == 44_229_076
    core = sum(_count(getattr(mtan, n)) for n in ("encoder_block", "decoder_block", "conv_block_enc", "conv_block_dec"))
    assert core == 24_943_296
    assert _count(RefMTAN(attention=False, tasks=(13,))) == 24_981_069 == core + (9 * 64 * 64 + 64) + (64 * 13 + 13)
    # KD4MTL's SegNet ('standard'): the same encoder-decoder, three prediction layers, 6 log-variances
    assert _count(RefMTAN(attention=False)) + 6 == core + 3 * (9 * 64 * 64 + 64) + 64 * 17 + 17 + 6 == 25_055_191


def test_segnet_trunk_and_mtan_counts_equal_the_reference():
    ref = RefMTAN()
    trunk = SegNetTrunk(64)
    core = sum(_count(getattr(ref, n)) for n in ("encoder_block", "decoder_block", "conv_block_enc", "conv_block_dec"))
    assert count_parameters(trunk) == core == 24_943_296
    model = build_model(OmegaConf.structured(ModelConfig(arch="segnet_mtan", width=64)), _nyuv2_tasks())
    assert count_parameters(model) == _count(ref) - ref.logsigma.numel() == 44_229_073


def _mtan_pairs(model, ref):
    """(kdmtl module, MTAN module) pairs covering every parameter of both, conv block by conv block."""
    def convs(block):  # a conv_layer, or a Sequential of two conv_layers
        return [block] if isinstance(block[0], nn.Conv2d) else list(block)

    stages = model.trunk.stages
    pairs = []
    for i in range(5):
        pairs += zip(stages[i], [ref.encoder_block[i]] + convs(ref.conv_block_enc[i]))
    for j in range(5):
        k = 4 - j
        pairs += zip(stages[5 + j], [ref.decoder_block[k]] + convs(ref.conv_block_dec[k]))
    pairs += zip(model.trunk.attention.encoder, ref.encoder_block_att)
    pairs += zip(model.trunk.attention.decoder, ref.decoder_block_att)
    for t, name in enumerate(("seg", "depth", "normal")):
        head = model.heads[name]
        head = getattr(head, "head", head)
        pairs += zip(head.encoder, ref.encoder_att[t])
        pairs += zip(head.decoder, ref.decoder_att[t])
        pairs.append((head.predict, ref.pred[t]))
    return pairs


def test_mtan_equals_the_reference_network():
    """Weights copied module by module into the transcription: same predictions."""
    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(ModelConfig(arch="segnet_mtan", width=4)), _nyuv2_tasks())
    ref = RefMTAN(filter=(4, 8, 16, 32, 32))
    pairs = _mtan_pairs(model, ref)
    assert sum(_count(a) for a, _ in pairs) == count_parameters(model) == _count(ref) - 3
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    for a, b in pairs:
        b.load_state_dict(a.state_dict())
    model.eval(), ref.eval()
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        out = model(x)["outputs"]
        seg, depth, normal = ref(x)
    assert torch.allclose(out["seg"], seg, atol=1e-4)
    assert torch.allclose(out["depth"], depth * 1.0 + 2.0, atol=1e-4)   # ScaledHead: std 1, mean 2
    assert torch.allclose(out["normal"], normal, atol=1e-4)


def test_segnet_and_mtan_initialisation_is_mtans():
    """Default init = MTAN's loop (Xavier-normal conv / linear weights, bias 0, BN 1 / 0), drawn in
    the same order from the same RNG stream: trunk at construction, then each head."""
    from kdmtl_cli.models.multitask import MultiTaskModel

    for attention in (False, True):
        torch.manual_seed(0)
        ours = MultiTaskModel(SegNetTrunk(4, attention=attention), _nyuv2_tasks(), decoder_width=4)
        torch.manual_seed(0)
        trunk = SegNetTrunk(4, attention=attention, init="pytorch")
        for m in trunk.modules():   # kdmtl's DenseDecoder laterals have no bias; every MTAN conv has one
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1), nn.init.constant_(m.bias, 0)

        def init_head(head):                 # runs where kdmtl's does: right after each head is built
            for m in head.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.xavier_normal_(m.weight)
                    if m.bias is not None:
                        nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1), nn.init.constant_(m.bias, 0)

        trunk.init_head = init_head
        theirs = MultiTaskModel(trunk, _nyuv2_tasks(), decoder_width=4)
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), (attention, name)
        convs = [m for m in ours.modules() if isinstance(m, nn.Conv2d)]
        assert all(m.bias is None or not m.bias.any() for m in convs)
    big = SegNetTrunk(64).stages[3][1][0]          # 512 -> 512 3x3 conv: xavier std sqrt(2 / (9 * 1024))
    assert abs(big.weight.std().item() / (2 / (9 * 1024)) ** 0.5 - 1) < 0.01
