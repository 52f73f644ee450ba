"""Typed schemas of every config group.

The composed Hydra config is merged onto these dataclasses before any work is
done (``validate``), so a typo'd key, a wrong type or a ``+new.key=`` that no
schema knows fails at once with one line naming the key and the valid keys.
Each field's comment is its documentation; units are in the names.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above, at_least, between

# Seeds (data.seed, seed): numpy's default_rng (the shapes generator) refuses negative seeds, and seeds are
# multiplied into torch generator seeds (seed * 100_003 + ..., data/loader.py) that must fit 64 bits;
# 2^32 - 1 is also numpy's legacy seeding limit. Torch itself would silently wrap a negative seed.
SEED_MAX = 2**32 - 1


@dataclass
class DataConfig:
    name: str = "shapes"                  # data set, by registry name (kdmtl_cli/data/)
    root: str = "${cache_dir}/data"       # where the data set lives / is generated
    generate: bool = True                 # create a missing generated data set (like torchvision's download)
    # pixels per side; 8 is the least any generator draws in (digits_mtl needs 20 and says so)
    image_size: int = at_least(8, default=32)
    train_size: int = at_least(1, default=4000)   # images per split
    val_size: int = at_least(0, default=1000, note="0 = no validation split")
    test_size: int = at_least(1, default=2000)
    seed: int = between(0, SEED_MAX, default=0)   # data generation seed, independent of the training seed
    min_objects: int = at_least(1, default=2)     # objects per generated scene
    max_objects: int = at_least("min_objects", default=4)
    batch_size: int = at_least(1, default=64)     # training batch (samples)
    eval_batch_size: int = at_least(1, default=256)
    hflip: bool = True                    # random horizontal flip, applied to image and dense targets alike
    mean: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per-channel normalisation
    std: List[float] = above(0, factory=lambda: [0.25, 0.25, 0.25])   # divides: each > 0
    download: bool = True                 # cifar*: let torchvision download missing files (needs network)
    # random crop (train only): zero-pad by this many pixels, crop back; 0 = off
    crop_padding: int = at_least(0, default=0)
    # random scale-crop (train only; nyuv2, cityscapes): per sample a scale s from this list, a random
    # (H/s, W/s) window resized back, depth / s (Nash-MTL/CAGrad RandomScaleCrop: [1.0, 1.2, 1.5]); null = off
    scale_crop: Optional[List[float]] = None
    min_tiles: int = at_least(1, default=2)       # cifar_cls_seg: CIFAR tiles pasted per mosaic
    max_tiles: int = at_least("min_tiles", default=4)
    min_tile_size: int = at_least(1, default=16)  # cifar_cls_seg: tile side in pixels (resized from 32x32)
    max_tile_size: int = at_least("min_tile_size", default=40)  # capped at data.image_size
    loader: str = "auto"                  # auto (tensor if the split fits in tensor_max_mb) | tensor | dataloader
    # dataloader path: worker processes building samples (0 = main process)
    num_workers: int = at_least(0, default=2)
    # auto: largest split (MiB) kept resident; on CUDA also <= 1/4 of free memory (0: auto never keeps one)
    tensor_max_mb: int = at_least(0, default=4096)


@dataclass
class TaskConfig:
    kind: str = MISSING                   # classification | multilabel | segmentation | depth | normals | regression
    target: Optional[str] = None          # data set target feeding this task; default: the task's name
    auxiliary: bool = False               # trained and reported, but excluded from Δm and from val/loss/task


@dataclass
class OptimConfig:
    name: str = "adam"                    # adam | adamw | sgd
    lr: float = above(0, default=3e-3)
    weight_decay: float = at_least(0, default=0.0)
    momentum: float = between(0, 1, default=0.9, high_open=True)   # sgd only; 1 would never forget a gradient
    nesterov: bool = False                # sgd only
    epochs: int = at_least(1, default=6)
    scheduler: str = "cosine"             # cosine | step | multistep | constant (stepped every batch)
    warmup_epochs: float = at_least(0, default=0.0)   # linear warm-up, may be fractional
    step_epochs: int = at_least(1, default=30)        # step scheduler: decay every this many epochs
    gamma: float = above(0, default=0.1)              # step, multistep: decay factor
    milestones: List[int] = at_least(1, factory=list)  # multistep: epochs after which lr *= gamma
    grad_clip_norm: Optional[float] = above(0, default=None)   # null = no clipping


@dataclass
class ModelConfig:
    # convnet | resnet18/34/50 (torchvision) | the CIFAR zoo: resnet8..110, resnet8x4, resnet32x4,
    # wrn_16_1/16_2/40_1/40_2, vgg8..19, mobilenetv2, shufflenetv1, shufflenetv2 (kdmtl_cli/models/)
    arch: str = "convnet"
    width: int = at_least(1, default=16)          # convnet: channels of the first stage (doubles per stage)
    depth: int = at_least(1, default=1)           # convnet: residual blocks per stage
    stages: int = at_least(1, default=3)          # convnet: stages (each after the first halves the resolution)
    stem_stride: int = at_least(1, default=1)     # convnet: 2 halves the resolution of every stage (4x cheaper)
    decoder_width: int = at_least(1, default=16)  # channels of the dense-task decoders
    # dense-task heads: auto (the trunk's own: kdmtl's DenseDecoder, or MTAN's attention heads for
    # segnet_mtan) | mtan (segnet: MTAN's prediction layer, 3x3 conv + 1x1 conv on the decoder output)
    head: str = "auto"
    weights: Optional[str] = None         # torchvision trunks: local weights file (nothing is downloaded)
    small_input: bool = True              # torchvision trunks: 3x3 stem without max-pool, for 32-64 px images


@dataclass
class TeacherConfig(ModelConfig):
    mode: str = "multitask"               # multitask: one teacher for all its tasks | per_task: one teacher per task
    checkpoint: Optional[str] = None      # load this teacher (.pt from kdmtl or .safetensors) instead of training
    checkpoints: Dict[str, str] = field(default_factory=dict)  # per_task: {task: path}; other tasks are trained
    tasks: Optional[List[str]] = None     # tasks the teacher covers; default: all student tasks
    optim: OptimConfig = field(default_factory=OptimConfig)  # how a teacher is trained when not loaded
    # Teacher-output cache: off | views (K stored augmented views per sample, one drawn per epoch:
    # FKD; engine/teacher_outputs.py) | exact (every view drawn, stored when first drawn; training
    # bit-identical to off; engine/teacher_exact.py) | deterministic (one unaugmented view per sample)
    cache: str = "off"
    cache_views: int = at_least(1, default=4)     # K, for cache=views
    # keep only the k largest classification logits (+ log-sum-exp); null = all
    cache_topk: Optional[int] = at_least(1, default=None)
    cache_dtype: Optional[str] = None     # float16 | float32 | null: float32 for exact, float16 otherwise
    # a teacher trained here keeps: best (by val/loss/task; the last epoch when data.val_size=0) |
    # last (RepDistiller) | train_loss (lowest epoch-mean training task loss, KD4MTL); in the cache key unless best
    keep: str = "best"


@dataclass
class KDConfig:
    """Logit KD (Hinton et al., 2015) for every task the teacher covers (conf/loss/kd.yaml)."""
    # a number, or {task: number}; official recipe 0.9 with task_weight 0.1. No method defines a
    # negative distillation weight (it would push the student away from the teacher): every weight is >= 0.
    weight: Any = at_least(0, default=0.5)
    temperature: float = above(0, default=4.0)    # T; the KL terms are scaled by T^2
    dense: str = "l1"                     # depth/regression tasks: l1 | l2 to the teacher's prediction


@dataclass
class DKDConfig:
    """Decoupled KD (Zhao et al., CVPR 2022), as mdistiller (conf/loss/dkd.yaml)."""
    weight: Any = at_least(0, default=1.0)        # a number, or {task: number}
    alpha: float = at_least(0, default=1.0)       # target-class term (TCKD)
    beta: float = at_least(0, default=8.0)        # non-target-class term (NCKD)
    temperature: float = above(0, default=4.0)
    # weight factor min(epoch / warmup_epochs, 1)
    warmup_epochs: float = at_least(0, default=20.0, note="0 = no warm-up")
    warmup_schedule: str = "epoch"        # epoch: mdistiller's (1-based epoch, per epoch) | linear: continuous from 0


@dataclass
class FeaturePairsConfig:
    """Student/teacher features (forward hooks; `[task:]path[/i]`), paired by position."""
    weight: float = at_least(0, default=1.0)
    student: List[str] = field(default_factory=lambda: ["trunk.stages.1"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.1"])


@dataclass
class FitNetConfig(FeaturePairsConfig):
    """FitNet hints as RepDistiller (conf/loss/fitnet.yaml)."""
    weight: float = at_least(0, default=100.0)
    regressor: str = "convreg"            # convreg: RepDistiller's ConvReg | conv1x1: 1x1 conv + BN + resize (any sizes)


@dataclass
class ATConfig(FeaturePairsConfig):
    """Attention transfer as RepDistiller (conf/loss/at.yaml); weight is the paper's beta."""
    weight: float = at_least(0, default=1000.0)
    p: float = above(0, default=2.0)        # attention map mean_c F^p
    student: List[str] = field(default_factory=lambda: ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"])


@dataclass
class KD4MTLConfig:
    """Li & Bilen (ECCV-W 2020), as VICO-UoE/KD4MTL (conf/loss/kd4mtl.yaml)."""
    weight: Any = at_least(0, default=1.0)        # lambda: a number, or {task: number}
    student: Any = field(default_factory=lambda: ["trunk/-1", "trunk/0"])   # shared features (a name or a list)
    teacher: Any = field(default_factory=lambda: ["trunk/-1", "trunk/0"])   # each task teacher's features
    adaptor_lr: float = above(0, default=0.1)     # the adaptors' learning rate (official --alr)
    # the adaptors' weight decay (official transformer_optimizer)
    adaptor_weight_decay: float = at_least(0, default=5e-4)
    adaptor_scheduled: bool = False       # official: the adaptors' optimiser has no schedule; true: the student's applies


@dataclass
class BAMConfig:
    """Teacher annealing (Clark et al., ACL 2019): target = p*one-hot + (1-p)*teacher softmax."""
    weight: Any = at_least(0, default=1.0)        # a number, or {task: number}
    reduction: str = "mean"               # mean over samples / pixels | sum (the official code sums over the batch)


@dataclass
class LossConfig:
    """Task losses plus the chosen distillation methods (`loss=kd`, `loss=[kd,at]`, `loss=none`)."""
    # weight of each task loss: a number, or {task: number}; 0 drops a task's loss (BAM's official setting)
    task_weight: Any = at_least(0, default=1.0)
    kd: Optional[KDConfig] = None
    dkd: Optional[DKDConfig] = None
    fitnet: Optional[FitNetConfig] = None
    at: Optional[ATConfig] = None
    kd4mtl: Optional[KD4MTLConfig] = None
    bam: Optional[BAMConfig] = None


@dataclass
class WeightingConfig:
    """How the tasks' losses (each with its distillation terms) become one step (kdmtl_cli/weighting/).
    Fields a strategy does not use must stay at their defaults (checked)."""
    name: str = "equal"                   # equal | fixed | uncertainty | dwa | gradnorm | pcgrad | cagrad | famo
    weights: Any = at_least(0, default=1.0)       # fixed: a number, or {task: number}
    temperature: float = above(0, default=2.0)    # dwa: T of the softmax over loss-descent rates
    alpha: float = at_least(0, default=1.5)       # gradnorm: restoring-force strength (0: equal gradient norms)
    # famo: learning rate of its task logits (gradnorm's follow optim.lr)
    lr: float = above(0, default=0.025)
    c: float = at_least(0, default=0.4)           # cagrad: radius of the ball around the mean gradient (0: the mean)
    gamma: float = at_least(0, default=0.01)      # famo: weight decay of its logits
    # famo: clip the trunk gradient's norm to this after backward
    max_norm: float = at_least(0, default=1.0, note="0 = off")


@dataclass
class DeltaMConfig:
    """Δm%: the multi-task run against single-task baselines (kdmtl_cli/report/delta_m.py)."""
    baseline: Optional[str] = None        # baseline file (YAML) of single-task test metrics; Δm reported when set
    record: Optional[str] = None          # single-task runs: add this run's test metrics to this baseline file
    convention: str = "maninis"           # headline number: maninis (mean over all metrics) | per_task (LibMTL)


@dataclass
class HardwareConfig:
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    precision: str = "32"                 # 32 | bf16 | 16-mixed
    num_threads: Optional[int] = at_least(1, default=None)  # CPU threads for torch; null: torch's choice
    deterministic: bool = True            # deterministic kernels (bit-reproducible CPU runs)
    channels_last: bool = True            # NHWC memory layout: faster convolutions on CPU and GPU
    keep_freed_memory: bool = True        # glibc malloc keeps freed step memory for reuse (engine/host_memory.py)
    compile: bool = False                 # torch.compile the models' forward (keys of state_dict unchanged)
    compile_mode: str = "default"         # default | reduce-overhead | max-autotune
    nproc: int = at_least(1, default=1)           # data-parallel processes (kdmtl starts them; hardware=ddp)


@dataclass
class TestConfig:
    # also test after each of the last N epochs and record each metric's mean as
    # test_mean_lastN/... (MTAN / Nash-MTL / CAGrad); 0 = off. The selected checkpoint is tested as usual.
    average_last_epochs: int = at_least(0, default=0, note="0 = off")   # and <= optim.epochs (check_protocol)
    # depth and normals metrics in every evaluation (val and test): split = over every valid pixel
    # of the split; batch_mean = per evaluation batch, averaged over the batches with equal weight
    # (MTAN / Nash-MTL / CAGrad / KD4MTL; depends on data.eval_batch_size). Other kinds: over the split.
    metric_reduction: str = "split"


@dataclass
class CheckpointConfig:
    # selects `best` (never a test metric): a validation metric | train/loss/task, train/task/<t>
    # (epoch-mean training loss, KD4MTL) | last (the last epoch); with data.val_size=0 the
    # default val/loss/task stands for last
    monitor: str = "val/loss/task"
    mode: str = "auto"                    # min | max | auto (from the metric's direction)


@dataclass
class LogConfig:
    progress: str = "auto"                # auto (rich on a terminal, plain lines otherwise) | rich | plain | none
    every_n_steps: int = at_least(1, default=25)  # training losses to metrics.jsonl/TensorBoard every n steps
    tensorboard: bool = True
    efficiency: bool = True               # parameters, FLOPs and latency in the final table
    # per-task gradient norms on the trunk (0 = off; free with gradient-based weightings)
    grad_norms_every_n_steps: int = at_least(0, default=100, note="0 = off")


@dataclass
class DebugConfig:
    epochs: int = at_least(1, default=1)          # epochs of teacher and student
    max_batches: int = at_least(1, default=2)     # batches per epoch and per evaluation
    train_size: int = at_least(1, default=128)    # split sizes of generated data sets
    val_size: int = at_least(0, default=64, note="0 = no validation split")
    test_size: int = at_least(1, default=64)


@dataclass
class PublishedResult:
    """A published number an experiment should reproduce, beside its recipe (for comparison)."""
    metric: str = MISSING                 # kdmtl's key, e.g. test/cls/accuracy
    value: float = MISSING                # in kdmtl's units (accuracy as a fraction: 73.33% -> 0.7333)
    model: str = "student"                # student | teacher
    epoch: str = "last"                   # last | best | mean_lastN (mean of the last N epochs' tests, test.average_last_epochs=N)
    source: str = ""                      # paper and table


@dataclass
class TrainConfig:
    seed: int = between(0, SEED_MAX, default=0)
    cache_dir: str = "~/.cache/kdmtl"     # teacher cache and generated data (env KDMTL_CACHE)
    resume: Any = None                    # true (latest matching run) | path of a run dir | null
    # stop cleanly after this epoch, as if preempted; resume later
    stop_after_epoch: Optional[int] = at_least(1, default=None)
    limit_train_batches: Optional[int] = at_least(1, default=None)   # batches per epoch; null = all
    limit_eval_batches: Optional[int] = at_least(1, default=None)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: Dict[str, TaskConfig] = field(default_factory=dict)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    delta_m: DeltaMConfig = field(default_factory=DeltaMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    test: TestConfig = field(default_factory=TestConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: Optional[DebugConfig] = None
    published: List[PublishedResult] = field(default_factory=list)  # set by experiments


@dataclass
class EvalConfig:
    run_dir: str = MISSING                # a finished (or interrupted) kdmtl train run directory
    checkpoint: str = "best"              # best | last | a path to a kdmtl checkpoint
    split: str = "test"                   # val | test
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _schema_child(node: DictConfig, part: str):
    """The schema node under `part`; an Optional[Schema] section that is None by default
    (e.g. loss.at) stands for its schema, so its keys can be checked and listed."""
    child = node._get_node(part)
    ref_type = child._metadata.ref_type
    if child._is_none() and hasattr(ref_type, "__dataclass_fields__"):
        return OmegaConf.structured(ref_type)
    return node[part]


def _valid_keys(schema: Any, parent_key: str) -> List[str]:
    node = OmegaConf.structured(schema)
    for part in [p for p in parent_key.split(".") if p]:
        if not isinstance(node, DictConfig):
            return []
        child = _schema_child(node, part) if part in node else None
        if child is None:  # a Dict[str, Schema] node: the keys come from its element type
            element_type = node._metadata.element_type
            child = OmegaConf.structured(element_type) if hasattr(element_type, "__dataclass_fields__") else None
        node = child
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def check_added_keys(overrides: List[str], schema: type) -> None:
    """`+a.b=v` bypasses Hydra's struct checks even with the schema in the defaults list;
    check dotted additions against the schema before Hydra runs (so --cfg job is checked too)."""
    for override in overrides:
        if not override.startswith("+") or "=" not in override:
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if "." not in key or key.startswith("hydra.") or "/" in key:
            continue
        node = OmegaConf.structured(schema)
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, DictConfig):
                break
            if part in node:
                node = _schema_child(node, part)
                continue
            if node._metadata.object_type in (None, dict) and depth > 0:
                break  # a Dict[str, X] node: new entries are allowed, checked later by validate()
            raise KdmtlError(unknown_key_message(".".join(parts[:depth + 1]), schema))


def _passes_through_mapping(key: str, schema: type) -> bool:
    """Does this dotted key name an entry of a Dict[str, ...] field (e.g. teacher.checkpoints.seg)?"""
    node = OmegaConf.structured(schema)
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return False
        if node._metadata.object_type is dict and part not in node:
            return depth == len(parts) - 1  # a new entry itself, not a key inside one
        if part not in node:
            return False
        node = node[part]
    return False


def mapping_entry_overrides(overrides: List[str], schema: type) -> List[str]:
    """`teacher.checkpoints.seg=PATH` sets an entry of a mapping that may not exist yet;
    Hydra needs `++` (add or override) for that, so users need not know the difference."""
    rewritten = []
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" in override and not override.startswith(("+", "~", "-")) and "." in key \
                and not key.startswith("hydra.") and _passes_through_mapping(key, schema):
            override = "++" + override
        rewritten.append(override)
    return rewritten


def optional_parent(overrides: List[str], schema: type) -> Optional[str]:
    """The first override that sets a key inside an optional section that is off by default
    (e.g. loss.at.weight when `at` was not chosen): OmegaConf fails on it without naming it."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        node = OmegaConf.structured(schema)
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, DictConfig) or part not in node:
                break
            if node._get_node(part)._is_none():
                return ".".join(parts[:depth + 1]) + "|" + key
            node = node[part]
    return None


def unknown_key_message(full_key: str, schema: type) -> str:
    parent, _, leaf = full_key.rpartition(".")
    valid = _valid_keys(schema, parent)
    hint = difflib.get_close_matches(leaf, valid, n=1)
    where = f"'{parent}'" if parent else "the top level"
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"unknown config key '{full_key}'{suggestion}; valid keys in {where}: {', '.join(valid)}"


def validate(cfg: DictConfig, schema: type) -> DictConfig:
    """Merge ``cfg`` onto ``schema``; raise a one-line KdmtlError naming any bad key or value."""
    base = OmegaConf.structured(schema)
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        merged = OmegaConf.merge(base, plain)
        OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except ConfigKeyError as err:
        full_key = getattr(err, "full_key", None) or str(getattr(err, "key", "?"))
        raise KdmtlError(unknown_key_message(full_key, schema)) from None
    except ValidationError as err:
        full_key = getattr(err, "full_key", "?")
        detail = str(err).splitlines()[0]
        raise KdmtlError(f"bad value for config key '{full_key}': {detail}") from None
    except OmegaConfBaseException as err:
        full_key = getattr(err, "full_key", None)
        first = str(err).splitlines()[0]
        raise KdmtlError(f"config error at '{full_key}': {first}" if full_key else f"config error: {first}") from None
    return merged


def register_schemas() -> None:
    """Put the schemas in Hydra's ConfigStore: train.yaml and eval.yaml list them first in
    their defaults, so Hydra itself rejects bad keys and types while composing (--cfg job too)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="kdmtl_train_schema", node=TrainConfig)
    store.store(name="kdmtl_eval_schema", node=EvalConfig)
