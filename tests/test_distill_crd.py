"""`crd` (kdmtl_cli/distill/crd.py) against RepDistiller, in float64.

The `Official*` code below is transcribed from HobbitLong/RepDistiller at
b84f547c5db6a35318d4671d7d5c4de74c822403 (not from kdmtl's code):

- crd/criterion.py `eps = 1e-7` (L5), `CRDLoss` (L8-48), `ContrastLoss` (L51-76), `Embed` (L79-90),
  `Normalize` (L93-102);
- crd/memory.py `ContrastMemory` (L6-79; `self.multinomial.cuda()` at L15 left out: these tests run on
  the CPU) and `AliasMethod` (L82-139);
- dataset/cifar100.py `CIFAR100InstanceSample.__getitem__` (L159-168, mode 'exact'): contrast_idx = the
  sample's own index, then K negatives from `cls_negative[target]` (every sample of another class),
  without replacement while K <= len(cls_negative[target]) (L166-167);
- train_student.py L81-85 (feat_dim 128, mode exact, nce_k 16384, nce_t 0.07, nce_m 0.5), L190-198
  (s_dim/t_dim = feat[-1] widths, n_data = len(train_set), embed_s/embed_t trained with the student);
- helper/loops.py L130-133 (CRD on feat_s[-1], feat_t[-1]) and L184 (loss = ... + beta * loss_kd);
- scripts/run_cifar_distill.sh L29 `--distill crd -a 0 -b 0.8` (CRD+KD, L32: `-a 1 -b 0.8`).

Both sides get the same parameters, the same memory banks and the same contrast_idx; the loss, the
memories and Z after each step, and the gradients agree at 1e-9 (abs, or rel for large values); the max
abs difference of each comparison is printed (`pytest -s`) as `official-diff <what>: <value>`.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from conftest import FAST, run_kdmtl
from distill_checks import (assert_terms_logged, build_method, loss_yaml, make_tasks, randn, record_diff,
                            resume_equals_straight, settings_from_yaml, train_logs_finite_terms)
from kdmtl_cli.data import DataBundle, TargetSpec
from kdmtl_cli.distill import build_methods, method_names
from kdmtl_cli.distill.crd import (ContrastiveRepresentationDistillation, CRDConfig, CRDParts, crd_loss,
                                   draw_contrast_indices)
from kdmtl_cli.errors import KdmtlError

ATOL = 1e-9
pytestmark = pytest.mark.usefixtures("one_thread")

# ================================================================ official defaults, transcribed
# scripts/run_cifar_distill.sh L29: `--distill crd --model_s resnet8x4 -a 0 -b 0.8`
CRD_BETA = 0.8
# train_student.py L81-85
CRD_FEAT_DIM = 128          # `--feat_dim', default=128`
CRD_MODE = "exact"          # `--mode', default='exact'` -> kdmtl negatives=other_class
CRD_NCE_K = 16384           # `--nce_k', default=16384`
CRD_NCE_T = 0.07            # `--nce_t', default=0.07`
CRD_NCE_M = 0.5             # `--nce_m', default=0.5`
# crd/criterion.py L5
CRD_EPS = 1e-7


# ================================================================ official code, transcribed
# crd/criterion.py
eps = 1e-7


class OfficialCRDLoss(nn.Module):
    def __init__(self, opt):
        super().__init__()
        self.embed_s = OfficialEmbed(opt.s_dim, opt.feat_dim)
        self.embed_t = OfficialEmbed(opt.t_dim, opt.feat_dim)
        self.contrast = OfficialContrastMemory(opt.feat_dim, opt.n_data, opt.nce_k, opt.nce_t, opt.nce_m)
        self.criterion_t = OfficialContrastLoss(opt.n_data)
        self.criterion_s = OfficialContrastLoss(opt.n_data)

    def forward(self, f_s, f_t, idx, contrast_idx=None):
        f_s = self.embed_s(f_s)
        f_t = self.embed_t(f_t)
        out_s, out_t = self.contrast(f_s, f_t, idx, contrast_idx)
        s_loss = self.criterion_s(out_s)
        t_loss = self.criterion_t(out_t)
        loss = s_loss + t_loss
        return loss


class OfficialContrastLoss(nn.Module):
    def __init__(self, n_data):
        super().__init__()
        self.n_data = n_data

    def forward(self, x):
        bsz = x.shape[0]
        m = x.size(1) - 1
        Pn = 1 / float(self.n_data)
        P_pos = x.select(1, 0)
        log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
        P_neg = x.narrow(1, 1, m)
        log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
        loss = - (log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz
        return loss


class OfficialEmbed(nn.Module):
    def __init__(self, dim_in=1024, dim_out=128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.l2norm = OfficialNormalize(2)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = self.linear(x)
        x = self.l2norm(x)
        return x


class OfficialNormalize(nn.Module):
    def __init__(self, power=2):
        super().__init__()
        self.power = power

    def forward(self, x):
        norm = x.pow(self.power).sum(1, keepdim=True).pow(1. / self.power)
        out = x.div(norm)
        return out


# crd/memory.py
class OfficialContrastMemory(nn.Module):
    def __init__(self, inputSize, outputSize, K, T=0.07, momentum=0.5):
        super().__init__()
        self.nLem = outputSize
        self.unigrams = torch.ones(self.nLem)
        self.multinomial = OfficialAliasMethod(self.unigrams)
        # self.multinomial.cuda()   (L15; CPU here)
        self.K = K
        self.register_buffer('params', torch.tensor([K, T, -1, -1, momentum]))
        stdv = 1. / math.sqrt(inputSize / 3)
        self.register_buffer('memory_v1', torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))
        self.register_buffer('memory_v2', torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))

    def forward(self, v1, v2, y, idx=None):
        K = int(self.params[0].item())
        T = self.params[1].item()
        Z_v1 = self.params[2].item()
        Z_v2 = self.params[3].item()
        momentum = self.params[4].item()
        batchSize = v1.size(0)
        outputSize = self.memory_v1.size(0)
        inputSize = self.memory_v1.size(1)
        if idx is None:
            idx = self.multinomial.draw(batchSize * (self.K + 1)).view(batchSize, -1)
            idx.select(1, 0).copy_(y.data)
        weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach()
        weight_v1 = weight_v1.view(batchSize, K + 1, inputSize)
        out_v2 = torch.bmm(weight_v1, v2.view(batchSize, inputSize, 1))
        out_v2 = torch.exp(torch.div(out_v2, T))
        weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach()
        weight_v2 = weight_v2.view(batchSize, K + 1, inputSize)
        out_v1 = torch.bmm(weight_v2, v1.view(batchSize, inputSize, 1))
        out_v1 = torch.exp(torch.div(out_v1, T))
        if Z_v1 < 0:
            self.params[2] = out_v1.mean() * outputSize
            Z_v1 = self.params[2].clone().detach().item()
        if Z_v2 < 0:
            self.params[3] = out_v2.mean() * outputSize
            Z_v2 = self.params[3].clone().detach().item()
        out_v1 = torch.div(out_v1, Z_v1).contiguous()
        out_v2 = torch.div(out_v2, Z_v2).contiguous()
        with torch.no_grad():
            l_pos = torch.index_select(self.memory_v1, 0, y.view(-1))
            l_pos.mul_(momentum)
            l_pos.add_(torch.mul(v1, 1 - momentum))
            l_norm = l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            updated_v1 = l_pos.div(l_norm)
            self.memory_v1.index_copy_(0, y, updated_v1)
            ab_pos = torch.index_select(self.memory_v2, 0, y.view(-1))
            ab_pos.mul_(momentum)
            ab_pos.add_(torch.mul(v2, 1 - momentum))
            ab_norm = ab_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            updated_v2 = ab_pos.div(ab_norm)
            self.memory_v2.index_copy_(0, y, updated_v2)
        return out_v1, out_v2


class OfficialAliasMethod(object):
    def __init__(self, probs):
        if probs.sum() > 1:
            probs.div_(probs.sum())
        K = len(probs)
        self.prob = torch.zeros(K)
        self.alias = torch.LongTensor([0] * K)
        smaller = []
        larger = []
        for kk, prob in enumerate(probs):
            self.prob[kk] = K * prob
            if self.prob[kk] < 1.0:
                smaller.append(kk)
            else:
                larger.append(kk)
        while len(smaller) > 0 and len(larger) > 0:
            small = smaller.pop()
            large = larger.pop()
            self.alias[small] = large
            self.prob[large] = (self.prob[large] - 1.0) + self.prob[small]
            if self.prob[large] < 1.0:
                smaller.append(large)
            else:
                larger.append(large)
        for last_one in smaller + larger:
            self.prob[last_one] = 1


# dataset/cifar100.py CIFAR100InstanceSample.__init__ (L116-125): cls_negative[c] = every sample of another class
def official_cls_negative(labels, num_classes):
    cls_positive = [[] for i in range(num_classes)]
    for i in range(len(labels)):
        cls_positive[labels[i]].append(i)
    cls_negative = [[] for i in range(num_classes)]
    for i in range(num_classes):
        for j in range(num_classes):
            if j == i:
                continue
            cls_negative[i].extend(cls_positive[j])
    return cls_negative


# ================================================================ helpers
record = functools.partial(record_diff, atol=ATOL)


def _yaml():
    return loss_yaml("crd")


def _cfg(**overrides):
    return settings_from_yaml(CRDConfig, "crd", **overrides)


def _data(labels: torch.Tensor, target: str = "cls") -> DataBundle:
    """A training split of len(labels) samples with these class labels (images are never read)."""
    n = labels.shape[0]
    return DataBundle("fake", {target: TargetSpec("classification", int(labels.max()) + 1)},
                      {"train": {"image": torch.zeros(n, 3, 1, 1, dtype=torch.uint8), target: labels}},
                      [0.5] * 3, [0.25] * 3)


def _labels(n: int, classes: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _method(tasks=None, teacher_tasks=("cls",), labels=None, **overrides):
    method = build_method(ContrastiveRepresentationDistillation, CRDConfig, "crd",
                          make_tasks(4, 3) if tasks is None else tasks, teacher_tasks, **overrides)
    if labels is not None:
        method.bind_data(_data(labels))
    return method


def _method_and_official(f_s, f_t, n_data, k, negatives="other_class", feat_dim=16, seed=7):
    """kdmtl's method (bound to n_data random labels, set up on these features, float64) and RepDistiller's
    CRDLoss holding the same embeddings, memories and params (float64)."""
    labels = _labels(n_data, 4, seed=seed)
    method = _method(labels=labels, nce_k=k, negatives=negatives, feat_dim=feat_dim)
    method.setup({"trunk.stages.2": f_s}, {"trunk.stages.2": f_t})
    method.modules.double()
    opt = SimpleNamespace(s_dim=f_s.shape[1], t_dim=f_t.shape[1], feat_dim=feat_dim, nce_k=k, nce_t=CRD_NCE_T,
                          nce_m=CRD_NCE_M, n_data=n_data)
    official = OfficialCRDLoss(opt).double()
    official.load_state_dict(method.modules["trunk__stages__2"].state_dict())
    return method, official, labels


def _pooled(f):
    # RepDistiller feat[-1]: AvgPool2d over the whole last-stage map, flattened
    return f.mean(dim=(2, 3))


def _index(n_data, batch, seed):
    return torch.randperm(n_data, generator=torch.Generator().manual_seed(seed))[:batch]


# ================================================================ YAML defaults = official
def test_yaml_defaults_are_the_official_ones():
    cfg = _cfg()
    assert (cfg.weight, cfg.feat_dim, cfg.nce_k, cfg.nce_t, cfg.nce_m, cfg.eps) == \
        (CRD_BETA, CRD_FEAT_DIM, CRD_NCE_K, CRD_NCE_T, CRD_NCE_M, CRD_EPS)
    assert CRD_MODE == "exact" and cfg.negatives == "other_class" and cfg.label_task is None
    assert list(cfg.student) == list(cfg.teacher) == ["trunk.stages.2"]     # feat[-1]
    assert OmegaConf.to_container(OmegaConf.structured(CRDConfig)) == OmegaConf.to_container(cfg)
    assert set(_yaml()) == {f.name for f in CRDConfig.__dataclass_fields__.values()}


def test_the_method_is_found_by_name():
    cfg = OmegaConf.create({"crd": _yaml()})
    assert "crd" in method_names(cfg)
    assert [type(m) for m in build_methods(cfg, make_tasks(4, 3), ["cls"])] == [ContrastiveRepresentationDistillation]


def test_parts_start_as_repdistillers():
    """Same names, shapes and values from the same seed as CRDLoss(opt): embeddings, then the two
    memories uniform in [-stdv, stdv], params [K, T, -1, -1, momentum] in float32."""
    torch.manual_seed(3)
    ours = CRDParts(20, 24, CRD_FEAT_DIM, 300, 50, CRD_NCE_T, CRD_NCE_M).state_dict()
    torch.manual_seed(3)
    official = OfficialCRDLoss(SimpleNamespace(s_dim=20, t_dim=24, feat_dim=CRD_FEAT_DIM, nce_k=50, nce_t=CRD_NCE_T,
                                               nce_m=CRD_NCE_M, n_data=300)).state_dict()
    assert list(ours) == list(official)
    for key, value in official.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    stdv = 1.0 / math.sqrt(CRD_FEAT_DIM / 3)
    assert float(ours["contrast.memory_v1"].abs().max()) <= stdv
    # The memories are buffers, not parameters: the optimiser sees the two embeddings only.
    method = _method(labels=_labels(300, 4), nce_k=50)
    method.setup({"trunk.stages.2": torch.zeros(2, 20, 4, 4)}, {"trunk.stages.2": torch.zeros(2, 24, 4, 4)})
    (group,) = method.param_groups(0.1)
    assert sum(p.numel() for p in group["params"]) == (20 + 1) * CRD_FEAT_DIM + (24 + 1) * CRD_FEAT_DIM


# ================================================================ value, memories, Z and gradients
@pytest.mark.parametrize("n_data, batch, k, negatives", [
    (60, 4, 5, "other_class"),       # B (K+1) < n_data: rows gathered, as RepDistiller
    (60, 5, 20, "other_class"),      # B (K+1) >= n_data: one product with the whole memory, then a gather
    (40, 3, 25, "uniform"),
    (80, 6, 3, "uniform"),
])
def test_crd_equals_repdistiller_over_two_steps(n_data, batch, k, negatives):
    f_s, f_t = randn(batch, 6, 4, 4, seed=1, scale=2.0), randn(batch, 9, 2, 2, seed=2)
    method, official, _ = _method_and_official(f_s, f_t, n_data, k, negatives)
    parts = method.modules["trunk__stages__2"]
    for step in range(2):   # step 0 estimates Z; step 1 keeps it (and reads the updated memories)
        f_s, f_t = randn(batch, 6, 4, 4, seed=10 + step, scale=2.0), randn(batch, 9, 2, 2, seed=20 + step)
        index = _index(n_data, batch, seed=30 + step)
        torch.manual_seed(40 + step)
        contrast_idx = method.contrast_indices(index)
        torch.manual_seed(40 + step)
        terms = method({"features": {"trunk.stages.2": f_s}}, {"features": {"trunk.stages.2": f_t}},
                       {"index": index}, {})
        assert list(terms) == ["crd/trunk.stages.2"] and method.weight("crd/trunk.stages.2", {}) == CRD_BETA
        reference = official(_pooled(f_s), _pooled(f_t), index, contrast_idx)
        record("crd (RepDistiller CRDLoss)", terms["crd/trunk.stages.2"], reference)
        for buffer in ("memory_v1", "memory_v2", "params"):
            record(f"crd {buffer} after a step", getattr(parts.contrast, buffer), getattr(official.contrast, buffer))
        assert float(parts.contrast.params[2]) > 0 and float(parts.contrast.params[3]) > 0
    # the function itself, on a third batch, with gradients to the student feature and both embeddings
    f_s, f_t = randn(batch, 6, 4, 4, seed=50, scale=2.0), randn(batch, 9, 2, 2, seed=51)
    index = _index(n_data, batch, seed=52)
    contrast_idx = draw_contrast_indices(index, k, n_data, None)
    a, b = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
    ours = crd_loss(a, f_t, parts, index, contrast_idx, CRD_EPS)
    reference = official(_pooled(b), _pooled(f_t), index, contrast_idx)
    record("crd (RepDistiller CRDLoss)", ours, reference)
    ours.backward(), reference.backward()
    record("crd gradient, student feature", a.grad, b.grad)
    ours_params, official_params = dict(parts.named_parameters()), dict(official.named_parameters())
    assert set(ours_params) == set(official_params) == {f"embed_{side}.linear.{p}" for side in "st"
                                                        for p in ("weight", "bias")}
    for name, p in ours_params.items():
        record(f"crd gradient, {name}", p.grad, official_params[name].grad, rel=True)
    record("crd memory_v1 after a step", parts.contrast.memory_v1, official.contrast.memory_v1)


def test_weighted_sum_is_beta_times_crd_loss():
    """helper/loops.py L184 with -a 0 -b 0.8: the method's contribution is 0.8 * CRDLoss."""
    f_s, f_t = randn(4, 6, 4, 4, seed=60), randn(4, 9, 4, 4, seed=61)
    method, official, _ = _method_and_official(f_s, f_t, 50, 7)
    index = _index(50, 4, seed=62)
    torch.manual_seed(63)
    contrast_idx = method.contrast_indices(index)
    torch.manual_seed(63)
    terms = method({"features": {"trunk.stages.2": f_s}}, {"features": {"trunk.stages.2": f_t}}, {"index": index}, {})
    total = sum(method.weight(n, {}) * v for n, v in terms.items())
    record("crd method (RepDistiller -b 0.8 * CRDLoss)", total,
           CRD_BETA * official(_pooled(f_s), _pooled(f_t), index, contrast_idx), rel=True)


def test_per_task_teachers_give_one_memory_per_task_and_one_draw_per_batch():
    n_data, batch, k = 30, 4, 6
    s_feats = {"trunk.stages.2": randn(batch, 5, 2, 2, seed=70)}
    t_feats = {"cls:trunk.stages.2": randn(batch, 7, 2, 2, seed=71),
               "seg:trunk.stages.2": randn(batch, 3, 4, 4, seed=72)}
    method = _method(teacher_tasks=("cls", "seg"), labels=_labels(n_data, 4, seed=73), nce_k=k, feat_dim=8)
    method.setup(s_feats, t_feats)
    method.modules.double()
    assert [t.name for t in method.terms] == ["crd/trunk.stages.2@cls", "crd/trunk.stages.2@seg"]
    officials = []
    for term in method.terms:
        opt = SimpleNamespace(s_dim=5, t_dim=t_feats[term.teacher].shape[1], feat_dim=8, nce_k=k, nce_t=CRD_NCE_T,
                              nce_m=CRD_NCE_M, n_data=n_data)
        officials.append(OfficialCRDLoss(opt).double())
        officials[-1].load_state_dict(method.modules[term.key].state_dict())
    index = _index(n_data, batch, seed=74)
    torch.manual_seed(75)
    contrast_idx = method.contrast_indices(index)
    torch.manual_seed(75)
    terms = method({"features": s_feats}, {"features": t_feats}, {"index": index}, {})
    for (name, value), term, official in zip(terms.items(), method.terms, officials):
        record("crd (RepDistiller CRDLoss)", value,
               official(_pooled(s_feats["trunk.stages.2"]), _pooled(t_feats[term.teacher]), index, contrast_idx))
        record("crd memory_v2 after a step", method.modules[term.key].contrast.memory_v2, official.contrast.memory_v2)


# ================================================================ the negatives
def test_other_class_negatives_are_distinct_samples_of_other_classes():
    n_data, k, classes = 200, 40, 5
    labels = _labels(n_data, classes, seed=4)
    index = _index(n_data, 16, seed=5)
    torch.manual_seed(0)
    idx = draw_contrast_indices(index, k, n_data, labels)
    assert idx.shape == (16, k + 1) and idx.dtype == torch.long
    assert torch.equal(idx[:, 0], index)                          # the positive first (mode 'exact')
    cls_negative = official_cls_negative(labels.tolist(), classes)
    for row, i in zip(idx[:, 1:].tolist(), index.tolist()):
        assert len(set(row)) == k                                 # without replacement, as K <= len(cls_negative)
        assert set(row) <= set(cls_negative[int(labels[i])])      # every negative of another class
    # from torch's global generator: the same state draws the same negatives (what makes resume exact)
    torch.manual_seed(0)
    assert torch.equal(draw_contrast_indices(index, k, n_data, labels), idx)
    assert not torch.equal(draw_contrast_indices(index, k, n_data, labels), idx)
    # the largest K allowed takes every other-class sample
    available = n_data - int(torch.bincount(labels).max())
    method = _method(labels=labels, nce_k=available)
    for row, i in zip(method.contrast_indices(index)[:, 1:].tolist(), index.tolist()):
        assert len(set(row)) == available and set(row) <= set(cls_negative[int(labels[i])])


def test_other_class_negatives_are_uniform_over_the_other_classes():
    """Each other-class sample is drawn about equally often (np.random.choice without replacement: K / M each)."""
    labels = torch.tensor([0] * 6 + [1] * 10 + [2] * 4)
    index = torch.tensor([0, 6, 16])
    torch.manual_seed(1)
    counts = torch.zeros(3, 20)
    draws = 3000
    for _ in range(draws):
        idx = draw_contrast_indices(index, 5, 20, labels)
        counts.scatter_add_(1, idx[:, 1:], torch.ones(3, 5))
    for row, c in enumerate(labels[index].tolist()):
        others = labels != c
        expected = draws * 5 / int(others.sum())
        assert float(counts[row][~others].sum()) == 0
        assert float((counts[row][others] / expected - 1).abs().max()) < 0.12, counts[row]


def test_uniform_negatives_match_the_official_alias_table():
    """negatives=uniform draws uniformly from the split, as RepDistiller's AliasMethod over torch.ones(n):
    its table gives every outcome probability 1/n."""
    for n in (7, 50, 1000, 50000):
        alias = OfficialAliasMethod(torch.ones(n))
        mass = alias.prob.double().clone()
        mass.index_add_(0, alias.alias, 1 - alias.prob.double())
        assert float((mass / n - 1 / n).abs().max()) < 1e-6 / n, n
    index = torch.tensor([3, 9, 0])
    torch.manual_seed(2)
    idx = draw_contrast_indices(index, 30, 10, None)
    assert torch.equal(idx[:, 0], index) and int(idx.min()) >= 0 and int(idx.max()) < 10


# ================================================================ errors
def test_bad_settings_fail_in_one_line():
    no_labels = {k: v for k, v in make_tasks(4, 3).items() if k != "cls"}
    with pytest.raises(KdmtlError, match="teacher covers no classification task.*loss.crd.negatives=uniform"):
        _method(tasks=no_labels, teacher_tasks=("seg", "depth"))
    with pytest.raises(KdmtlError, match="loss.crd.label_task 'seg' is not a classification task"):
        _method(label_task="seg")
    with pytest.raises(KdmtlError, match="loss.crd.label_task 'nope'"):
        _method(label_task="nope")
    with pytest.raises(KdmtlError, match="loss.crd.negatives must be other_class or uniform"):
        _method(negatives="random")
    _method(tasks=no_labels, teacher_tasks=("seg",), negatives="uniform")        # no labels needed
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    with pytest.raises(KdmtlError, match=r"loss.crd.nce_k \(31\) exceeds the 30 training samples .*nce_k <= 30"):
        _method(labels=labels, nce_k=31)
    _method(labels=labels, nce_k=30)
    with pytest.raises(KdmtlError, match=r"loss.crd.nce_k \(60\) must be below the 60 training samples"):
        _method(labels=labels, nce_k=60, negatives="uniform")
    with pytest.raises(KdmtlError, match="needs the training split"):
        _method().setup({"trunk.stages.2": torch.zeros(2, 4)}, {"trunk.stages.2": torch.zeros(2, 4)})
    with pytest.raises(KdmtlError, match="features must be"):
        _method(labels=labels, nce_k=8).setup({"trunk.stages.2": torch.zeros(2, 4, 2)},
                                              {"trunk.stages.2": torch.zeros(2, 4)})
    with pytest.raises(KdmtlError) as info:
        _method(labels=labels)           # the default K = 16384
    assert "\n" not in str(info.value) and "loss.crd.nce_k (16384)" in str(info.value)


def test_several_processes_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KdmtlError, match="loss=crd is not supported with several processes"):
        _method()


# ================================================================ through the real CLI
K_CLI = "loss.crd.nce_k=16"   # the fast run's 128 training samples have ~90 of other classes; 16384 is refused


@pytest.mark.parametrize("loss, methods, extra", [("crd", ["crd"], []), ("[kd,crd]", ["kd", "crd"], []),
                                                  ("crd", ["crd"], ["loss.crd.negatives=uniform"])])
def test_cli_train_with_the_method(loss, methods, extra, workdir, shared_cache):
    run_dir = train_logs_finite_terms(loss, methods, workdir, shared_cache, extra=[K_CLI, *extra])
    assert_terms_logged(run_dir, "crd", ["crd/trunk.stages.2"])
    # the memory banks and Z are in the checkpoint, one row per training sample, Z estimated
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["objective"]
    n_data = int(OmegaConf.load(run_dir / ".hydra" / "config.yaml").debug.train_size)   # debug=fast's split
    for bank in ("memory_v1", "memory_v2"):
        assert state[f"crd.trunk__stages__2.contrast.{bank}"].shape == (n_data, CRD_FEAT_DIM)
    params = state["crd.trunk__stages__2.contrast.params"]
    assert params[0] == 16 and params[2] > 0 and params[3] > 0


def test_cli_refuses_a_k_the_split_cannot_give(workdir, shared_cache):
    from conftest import assert_one_line_error

    # set on the command line, so debug=fast (which shrinks nce_k to a quarter of its split) leaves it
    proc = run_kdmtl(["train", "loss=crd", "loss.crd.nce_k=16384", *FAST, f"hydra.run.dir={workdir / 'run'}"],
                     workdir, shared_cache)
    assert_one_line_error(proc, "loss.crd.nce_k (16384) exceeds")


@pytest.mark.slow   # ~25 s: four CLI runs
def test_cli_resume_restores_memory_z_and_embeddings(workdir, shared_cache):
    """2 epochs straight vs stopped after 1 and resumed: the embeddings, both memories and Z equal bit
    for bit (resume_equals_straight of distill_checks, with loss.crd.nce_k set)."""
    prefix = "crd.trunk__stages__2."
    after_one, reference, resumed = resume_equals_straight(
        "crd", workdir, shared_cache, [prefix + k for k in ("embed_s.linear.weight", "embed_t.linear.weight",
                                                            "contrast.memory_v1", "contrast.memory_v2")],
        extra=[K_CLI])
    reference, resumed = reference["objective"], resumed["objective"]
    keys = {prefix + k for k in ("embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight",
                                 "embed_t.linear.bias", "contrast.params", "contrast.memory_v1", "contrast.memory_v2")}
    assert set(reference) == set(resumed) == keys
    # Z was estimated in epoch 1 and kept
    assert torch.equal(after_one["objective"][prefix + "contrast.params"], reference[prefix + "contrast.params"])
