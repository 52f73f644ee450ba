"""`crd`: contrastive representation distillation (Tian, Krishnan & Isola, "Contrastive Representation
Distillation", ICLR 2020) as the authors' RepDistiller (HobbitLong/RepDistiller b84f547): crd/criterion.py
`CRDLoss` (L8-48), `ContrastLoss` (L51-76, eps = 1e-7 at L5), `Embed` + `Normalize` (L79-102);
crd/memory.py `ContrastMemory` (L6-79) and `AliasMethod`; dataset/cifar100.py `CIFAR100InstanceSample`
(L95-169: how `contrast_idx` is drawn); train_student.py L81-85 (feat_dim 128, mode exact, nce_k 16384,
nce_t 0.07, nce_m 0.5), L190-198 (s_dim/t_dim from feat[-1], n_data = the training set's size,
embed_s and embed_t trained with the student); helper/loops.py L130-133 (CRD on feat_s[-1], feat_t[-1],
the average-pooled, flattened last-stage outputs) and L184 (loss = gamma CE + alpha KL + beta CRD);
scripts/run_cifar_distill.sh L29 (`--distill crd -a 0 -b 0.8`) and L32 (CRD+KD: `-a 1 -b 0.8`).

Per (student, teacher) feature pair, both pooled features are embedded by a learned linear layer and
L2-normalised (v1 student, v2 teacher, feat_dim wide). Two memory banks of n_data x feat_dim (the size
of the training split), uniform in [-stdv, stdv], stdv = 1 / sqrt(feat_dim / 3), hold one vector per
training sample: memory_v1 the student's, memory_v2 the teacher's. Each sample i of the batch is
contrasted with K + 1 rows of the other side's memory, its own row first (the positive) and K
negatives: out_v2[i, j] = exp(<memory_v1[idx[i, j]], v2_i> / T) / Z_v2 and out_v1 the same with
memory_v2 and v1. The normalisation constants Z = mean(exp(...)) * n_data are estimated once, on the
first training batch, and kept. The NCE loss of each side (ContrastLoss) with m = K and Pn = 1 / n_data:
-(sum_i log(P_i0 / (P_i0 + m Pn + eps)) + sum_{i, j>0} log(m Pn / (P_ij + m Pn + eps))) / N, and the term
is the student side's plus the teacher side's. After the scores, each batch sample's memory rows move
towards its embeddings: row = normalise(momentum * row + (1 - momentum) * v).

Here: the named module's output is taken and, when it is an [N, C, H, W] map, global-average-pooled
to [N, C]; the default is `trunk.stages.2`, the last stage. The embeddings, memory banks and the
`params` buffer ([K, T, Z_v1, Z_v2, momentum], Z = -1 until estimated) of a pair live in
`self.modules` under RepDistiller's names (embed_s.linear, embed_t.linear, contrast.params,
contrast.memory_v1/v2: a state dict loads into `CRDLoss`), so the optimiser trains the embeddings and
checkpoints save and restore the banks and Z. The memory is read and updated only by training
batches (the trainer calls the methods only there; evaluation never runs them), with each batch's
`index` into the training split. One term per pair, `crd/<student feature>` (`@<task>` with per-task
teachers, each with its own memory), weighted by `loss.crd.weight` = beta. The negatives are drawn on
the batch's device from torch's global generator, whose state checkpoints save: a resumed run draws
what the uninterrupted one drew. `loss.crd.negatives`:

- ``other_class`` (default; RepDistiller's CIFAR-100 path, `--mode exact`): sample i's K negatives are K
  distinct training samples of classes other than i's, in the classification task
  `loss.crd.label_task` (default: the first classification task the teacher covers); the positive
  is i itself.
- ``uniform``: RepDistiller's path without `contrast_idx` (ContrastMemory.forward L35-37: AliasMethod
  over uniform probabilities, i.e. K indices drawn uniformly with replacement from the whole training
  split, the positive written into column 0); for data without class labels.

Named differences from RepDistiller:

- Negatives are drawn in the loss on the device (keys uniform in [0, 1), same-class samples excluded,
  the K smallest kept: K distinct other-class samples, uniformly), not by numpy in data-loader
  workers; the distribution is the official `np.random.choice(cls_negative[target], k, replace=False)`.
- K larger than the other-class samples available (n_data minus the largest class) is refused with a
  one-line error; RepDistiller then switches to drawing with replacement (cifar100.py L166). With
  `uniform`, K must be below n_data.
- The scores <memory[idx], v> are one matrix product with the whole memory followed by a gather when
  the batch would gather at least n_data rows (B (K + 1) >= n_data, e.g. CIFAR-100 with K = 16384);
  RepDistiller always gathers B x (K + 1) x feat_dim rows and multiplies batch-wise. The same numbers up
  to rounding; far less memory traffic.
- Z is kept only in the `params` buffer (no Python float read back each step), estimated where the
  buffer still holds a negative value; no print.
- Several processes (DDP) are refused: each rank would update its own memory from its own indices.

mdistiller (megvii-research/mdistiller a08d46f, mdistiller/distillers/CRD.py) copies the same Embed,
ContrastLoss, ContrastMemory and AliasMethod (L88-281), applies them to the pooled feature
(`pooled_feat`, L75-80) and agrees on every default (engine/cfg.py L134-147: MODE exact, FEAT.DIM 128,
LOSS.FEAT_WEIGHT 0.8, NCE.K 16384, NCE.MOMENTUM 0.5, NCE.TEMPERATURE 0.07; its CE_WEIGHT 1.0 is
kdmtl's loss.task_weight); its data set draws the negatives as RepDistiller's (dataset/cifar100.py
L109-111).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.distill.pkt import pooled, vectors_as_maps
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above, at_least, between

NEGATIVES = ("other_class", "uniform")


@dataclass
class CRDConfig(FeaturePairsConfig):
    """Contrastive representation distillation as RepDistiller (conf/loss/crd.yaml); weight is beta."""
    weight: float = at_least(0, default=0.8)
    feat_dim: int = at_least(1, default=128)        # --feat_dim: the embeddings' (and memory rows') size
    nce_k: int = at_least(1, default=16384)         # --nce_k: negatives per positive
    nce_t: float = above(0, default=0.07)           # --nce_t: the temperature T of exp(<m, v> / T)
    nce_m: float = between(0, 1, default=0.5)       # --nce_m: momentum of the memory update
    eps: float = above(0, default=1e-7)             # crd/criterion.py `eps`, in ContrastLoss
    negatives: str = "other_class"                  # other_class (--mode exact) | uniform (AliasMethod)
    label_task: Optional[str] = None                # other_class: the classification task giving the classes
    student: List[str] = field(default_factory=lambda: ["trunk.stages.2"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.2"])


class Embed(nn.Module):
    """RepDistiller's Embed: flatten, a linear layer (with bias), L2 normalisation (see `embedded`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)


class ContrastMemory(nn.Module):
    """RepDistiller's ContrastMemory state: `params` = [K, T, Z_v1, Z_v2, momentum] (Z = -1 until the
    first batch estimates it), `memory_v1` (student side) and `memory_v2` (teacher side), each
    [n_data, feat_dim] uniform in [-stdv, stdv], stdv = 1 / sqrt(feat_dim / 3), drawn in that order."""

    def __init__(self, feat_dim: int, n_data: int, k: int, temperature: float, momentum: float):
        super().__init__()
        self.register_buffer("params", torch.tensor([k, temperature, -1.0, -1.0, momentum]))
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_v1", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_v2", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))


class CRDParts(nn.Module):
    """One pair's learned parts and memory, named as RepDistiller's CRDLoss (its state dict loads there)."""

    def __init__(self, student_dim: int, teacher_dim: int, feat_dim: int, n_data: int, k: int,
                 temperature: float, momentum: float):
        super().__init__()
        self.embed_s = Embed(student_dim, feat_dim)
        self.embed_t = Embed(teacher_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, n_data, k, temperature, momentum)


def embedded(feature: Tensor, embed: Embed, dtype: torch.dtype) -> Tensor:
    """[N, ...] -> [N, D]: flatten, linear, divide by the L2 norm (RepDistiller Embed + Normalize)."""
    x = F.linear(feature.to(dtype).flatten(1), embed.linear.weight.to(dtype), embed.linear.bias.to(dtype))
    return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


def contrast_scores(memory: Tensor, v: Tensor, idx: Tensor) -> Tensor:
    """[B, K+1]: <memory[idx[b, j]], v[b]> (memory is not differentiated). One product with the whole
    memory when the batch would gather at least as many rows as it holds, else a gather of the rows."""
    memory = memory.detach().to(v.dtype)
    if idx.numel() >= memory.shape[0]:
        # clone: the memory is updated in place before the backward pass, which reads it
        return (v @ memory.clone().t()).gather(1, idx)
    rows = memory.index_select(0, idx.reshape(-1)).view(*idx.shape, -1)
    return torch.bmm(rows, v.unsqueeze(2)).squeeze(2)


def momentum_update(memory: Tensor, index: Tensor, v: Tensor, momentum: Tensor) -> None:
    """memory[index] = normalise(momentum * memory[index] + (1 - momentum) * v), in place."""
    with torch.no_grad():
        rows = memory.index_select(0, index).to(v.dtype) * momentum + v.detach() * (1 - momentum)
        memory.index_copy_(0, index, (rows / rows.pow(2).sum(1, keepdim=True).pow(0.5)).to(memory.dtype))


def contrast(memory: ContrastMemory, v1: Tensor, v2: Tensor, index: Tensor, idx: Tensor):
    """RepDistiller ContrastMemory.forward with given `idx` [B, K+1]: (out_v1, out_v2), each [B, K+1],
    exp(score / T) / Z; estimates Z on the first call, then moves the batch's memory rows."""
    params = memory.params.detach().clone().to(v1.dtype)   # read before the in-place writes below
    temperature, momentum = params[1], params[4]
    n_data = memory.memory_v1.shape[0]
    out_v2 = torch.exp(contrast_scores(memory.memory_v1, v2, idx) / temperature)
    out_v1 = torch.exp(contrast_scores(memory.memory_v2, v1, idx) / temperature)
    with torch.no_grad():   # Z = mean * n_data where not yet set (-1), as stored in the buffer's dtype
        z = memory.params[2:4]
        estimate = torch.stack([out_v1.mean(), out_v2.mean()]) * n_data
        memory.params[2:4] = torch.where(z < 0, estimate.to(z.dtype), z)
    z = memory.params[2:4].detach().clone().to(v1.dtype)
    out_v1, out_v2 = out_v1 / z[0], out_v2 / z[1]
    momentum_update(memory.memory_v1, index, v1, momentum)
    momentum_update(memory.memory_v2, index, v2, momentum)
    return out_v1, out_v2


def nce_loss(x: Tensor, n_data: int, eps: float) -> Tensor:
    """RepDistiller ContrastLoss of [B, K+1] scores (positive first), noise Pn = 1 / n_data."""
    m = x.shape[1] - 1
    noise = m * (1.0 / float(n_data))
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + (noise + eps)))
    log_d0 = torch.log(noise / (x[:, 1:] + (noise + eps)))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


def crd_loss(student_feature: Tensor, teacher_feature: Tensor, parts: CRDParts, index: Tensor,
             contrast_idx: Tensor, eps: float = 1e-7) -> Tensor:
    """CRD of one feature pair (maps are pooled first) for the batch's training-split `index` [B] and
    `contrast_idx` [B, K+1] (the positive first); updates the pair's memory. In ``compute_dtype``."""
    dtype = compute_dtype(student_feature)
    # Autocast would run the embeddings and scores in float16/bfloat16 again; exp(<m, v> / 0.07) needs float32.
    with torch.autocast(student_feature.device.type, enabled=False):
        v1 = embedded(pooled(student_feature), parts.embed_s, dtype)
        v2 = embedded(pooled(teacher_feature), parts.embed_t, dtype)
        out_v1, out_v2 = contrast(parts.contrast, v1, v2, index, contrast_idx)
        n_data = parts.contrast.memory_v1.shape[0]
        return nce_loss(out_v1, n_data, eps) + nce_loss(out_v2, n_data, eps)


def draw_contrast_indices(index: Tensor, k: int, n_data: int, labels: Optional[Tensor] = None) -> Tensor:
    """[B, K+1]: column 0 the batch's own `index`, then K negatives per row from torch's generator of
    index's device: with `labels` ([n_data], on that device) K distinct samples of other classes,
    uniformly; without, K samples drawn uniformly with replacement from all n_data."""
    if labels is None:
        negatives = torch.randint(0, n_data, (index.shape[0], k), device=index.device)
    else:
        same = labels.index_select(0, index)[:, None] == labels[None, :]
        keys = torch.rand(index.shape[0], n_data, device=index.device).masked_fill_(same, math.inf)
        negatives = keys.topk(k, dim=1, largest=False).indices
    return torch.cat([index[:, None], negatives], dim=1)


@KD_METHODS.register("crd", settings=CRDConfig)
class ContrastiveRepresentationDistillation(FeaturePairMethod):
    name = "crd"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        from kdmtl_cli.engine.distributed import from_env

        if from_env().active:
            raise KdmtlError("loss=crd is not supported with several processes yet (each rank would update its "
                             "own memory bank); train it in one process")
        if cfg.negatives not in NEGATIVES:
            raise KdmtlError(f"loss.crd.negatives must be {' or '.join(NEGATIVES)} (got '{cfg.negatives}')")
        self.label_task = self._label_task() if cfg.negatives == "other_class" else None
        self.n_data: Optional[int] = None
        self.labels: Optional[Tensor] = None
        self._labels_on: Dict[torch.device, Tensor] = {}

    def _label_task(self) -> str:
        classification = [t for t, task in self.tasks.items() if task.kind.name == "classification"]
        name = self.cfg.label_task
        if name is None:
            covered = [t for t in self.teacher_tasks if t in classification]
            if not covered:
                raise KdmtlError("loss.crd.negatives=other_class draws negatives from other classes, but the "
                                 "teacher covers no classification task; name one with loss.crd.label_task or "
                                 "use loss.crd.negatives=uniform")
            return covered[0]
        if name not in classification:
            raise KdmtlError(f"loss.crd.label_task '{name}' is not a classification task of this run "
                             f"(classification tasks: {', '.join(classification) or 'none'})")
        return name

    def bind_data(self, data) -> None:
        n_data, k = data.size("train"), int(self.cfg.nce_k)
        if self.label_task is None:
            if k >= n_data:
                raise KdmtlError(f"loss.crd.nce_k ({k}) must be below the {n_data} training samples "
                                 f"(negatives=uniform); set loss.crd.nce_k <= {n_data - 1}")
        else:
            labels = data.splits["train"][self.tasks[self.label_task].target].reshape(-1).long()
            available = n_data - int(torch.unique(labels, return_counts=True)[1].max()) if n_data else 0
            if k > available:
                raise KdmtlError(f"loss.crd.nce_k ({k}) exceeds the {available} training samples outside the "
                                 f"largest class of '{self.label_task}' ({n_data} training samples); set "
                                 f"loss.crd.nce_k <= {available}")
            self.labels, self._labels_on = labels.cpu(), {}
        self.n_data = n_data

    def setup(self, student_features, teacher_features):
        if self.n_data is None:
            raise KdmtlError("loss=crd needs the training split (Method.bind_data) before its set-up")
        for term, student, teacher in self.checked_terms(vectors_as_maps(student_features),
                                                         vectors_as_maps(teacher_features)):
            self.modules[term.key] = CRDParts(pooled(student).flatten(1).shape[1], pooled(teacher).flatten(1).shape[1],
                                              int(self.cfg.feat_dim), self.n_data, int(self.cfg.nce_k),
                                              float(self.cfg.nce_t), float(self.cfg.nce_m))

    def contrast_indices(self, index: Tensor) -> Tensor:
        """The batch's [B, K+1] memory rows: itself, then K negatives (`loss.crd.negatives`)."""
        labels = None
        if self.labels is not None:
            if index.device not in self._labels_on:
                self._labels_on[index.device] = self.labels.to(index.device)
            labels = self._labels_on[index.device]
        return draw_contrast_indices(index, int(self.cfg.nce_k), self.n_data, labels)

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        index = batch["index"]
        contrast_idx = self.contrast_indices(index)   # one draw per batch, as the official data set's
        return {term.name: crd_loss(s_feats[term.student], t_feats[term.teacher], self.modules[term.key],
                                    index, contrast_idx, float(self.cfg.eps))
                for term in self.terms}
