"""Typed schemas of every config group.

The composed Hydra config is merged onto these dataclasses before any work is
done (``validate``), so a typo'd key, a wrong type or a ``+new.key=`` that no
schema knows fails at once with one line naming the key and the valid keys.
Each field's comment is its documentation; units are in the names.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
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
class DataCommon:
    """The `data` keys every data set has; a data set's own keys are its settings dataclass
    (registered with it in kdmtl_cli/data/<name>.py), added to this by `data_schema`."""
    name: str = "shapes"                  # data set, by registry name (kdmtl_cli/data/, or a plug-in file)
    root: str = "${cache_dir}/data"       # where the data set lives / is generated
    # pixels per side; 8 is the least any generator draws in (digits_mtl needs 20 and says so)
    image_size: int = at_least(8, default=32)
    train_size: int = at_least(1, default=4000)   # images per split
    val_size: int = at_least(0, default=1000, note="0 = no validation split")
    test_size: int = at_least(1, default=2000)
    seed: int = between(0, SEED_MAX, default=0)   # data generation seed, independent of the training seed
    batch_size: int = at_least(1, default=64)     # training batch (samples)
    eval_batch_size: int = at_least(1, default=256)
    hflip: bool = True                    # random horizontal flip, applied to image and dense targets alike
    mean: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per-channel normalisation
    std: List[float] = above(0, factory=lambda: [0.25, 0.25, 0.25])   # divides: each > 0
    # random crop (train only): zero-pad by this many pixels, crop back; 0 = off
    crop_padding: int = at_least(0, default=0)
    # random scale-crop (train only; nyuv2, cityscapes): per sample a scale s from this list, a random
    # (H/s, W/s) window resized back, depth / s (Nash-MTL/CAGrad RandomScaleCrop: [1.0, 1.2, 1.5]); null = off
    scale_crop: Optional[List[float]] = None
    # random resized crop (train only; torchvision's RandomResizedCrop on the stored H x W image): per
    # sample a window of area fraction in [min, max] and aspect ratio (log-uniform) in resized_crop_ratio,
    # resized back to H x W (bilinear image, nearest dense targets); null = off. ImageNet: [0.08, 1.0]
    resized_crop_scale: Optional[List[float]] = above(0, default=None, note="each <= 1; null = off")
    resized_crop_ratio: List[float] = above(0, factory=lambda: [3 / 4, 4 / 3])
    loader: str = "auto"                  # auto (tensor if the split fits in tensor_max_mb) | tensor | dataloader
    # dataloader path: worker processes building samples (0 = main process)
    num_workers: int = at_least(0, default=2)
    # auto: largest split (MiB) kept resident; on CUDA also <= 1/4 of free memory (0: auto never keeps one)
    tensor_max_mb: int = at_least(0, default=4096)


@dataclass
class TaskCommon:
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
class ModelCommon:
    """The keys of every student / teacher; a trunk's own keys (convnet's width, a torchvision
    trunk's weights...) are its settings dataclass, registered with it in kdmtl_cli/models/."""
    # convnet | torchvision trunks (resnet18/34/50/101, mobilenet_v3_*, efficientnet_*, convnext_tiny,
    # regnet_*) | timm | the CIFAR zoo (resnet8..110, resnet8x4, resnet32x4, wrn_*, vgg*, mobilenetv2,
    # shufflenetv1/v2) | segnet, segnet_mtan | a plug-in's name. Ignored when `trunk` or `model` is set.
    arch: str = "convnet"
    decoder_width: int = at_least(1, default=16)  # channels of the dense-task decoders
    # Your own trunk: {_target_: import.path.Class, arg: value...}, a torch.nn.Module whose forward returns
    # its feature maps (a list, deepest last); kdmtl attaches the task heads (README "Your own model").
    trunk: Any = None
    # Your own whole model: {_target_: ..., args}, forward(image) -> {task name: output}; no heads are added.
    model: Any = None


@dataclass
class TeacherCommon(ModelCommon):
    # multitask: one teacher for all its tasks | per_task: one teacher per task | ensemble: several
    # teachers for the same tasks (`members`), each distilled from on its own
    mode: str = "multitask"
    # ensemble: one entry per teacher, each the `teacher.*` keys it changes ({} = this teacher as it is;
    # arch/width/..., checkpoint, optim, keep) and its training `seed` (default: the run's seed + its position)
    members: List[Dict[str, Any]] = field(default_factory=list)
    # ensemble: each teacher's distillation terms form their own group `teacher.<k>` that the weighting
    # balances as it balances tasks (false: they join their task's loss, each times 1 / the number of teachers)
    balance: bool = False
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
class LossCommon:
    """Task losses plus the chosen distillation methods (`loss=kd`, `loss=[kd,at]`, `loss=none`).
    Each method's section (`loss.kd`, ...) is its settings dataclass, registered with it in
    kdmtl_cli/distill/<name>.py; `loss_schema` adds one optional section per method."""
    # weight of each task loss: a number, or {task: number}; 0 drops a task's loss (BAM's official setting)
    task_weight: Any = at_least(0, default=1.0)


@dataclass
class WeightingCommon:
    """How the tasks' losses (each with its distillation terms) become one step (kdmtl_cli/weighting/).
    A strategy's own keys are its settings dataclass; keys of other strategies must stay at their
    defaults (checked)."""
    name: str = "equal"                   # equal | fixed | uncertainty | dwa | gradnorm | pcgrad | cagrad | famo | a plug-in


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
class SearchConfig:
    # what a search (`-m hydra/sweeper=optuna`, kdmtl_cli/search.py) optimises: validation metrics at
    # the selected checkpoint (val/<task>/<metric>, val/task/<task>, val/loss/task) and student costs
    # (student/params, student/flops, student/latency_ms); several: a Pareto front. null: checkpoint.monitor
    objectives: Optional[List[str]] = None


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
class TrainCommon:
    seed: int = between(0, SEED_MAX, default=0)
    cache_dir: str = "~/.cache/kdmtl"     # teacher cache and generated data (env KDMTL_CACHE)
    resume: Any = None                    # true (latest matching run) | path of a run dir | null
    # stop cleanly after this epoch, as if preempted; resume later
    stop_after_epoch: Optional[int] = at_least(1, default=None)
    limit_train_batches: Optional[int] = at_least(1, default=None)   # batches per epoch; null = all
    limit_eval_batches: Optional[int] = at_least(1, default=None)
    # the plug-in sections: `train_schema` replaces these types by the derived ones
    data: DataCommon = field(default_factory=DataCommon)
    tasks: Dict[str, TaskCommon] = field(default_factory=dict)
    teacher: TeacherCommon = field(default_factory=TeacherCommon)
    student: ModelCommon = field(default_factory=ModelCommon)
    loss: LossCommon = field(default_factory=LossCommon)
    weighting: WeightingCommon = field(default_factory=WeightingCommon)
    delta_m: DeltaMConfig = field(default_factory=DeltaMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    test: TestConfig = field(default_factory=TestConfig)
    log: LogConfig = field(default_factory=LogConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
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


def validate(cfg: DictConfig, schema: type, explicit=()) -> DictConfig:
    """Merge ``cfg`` onto ``schema``; raise a one-line KdmtlError naming any bad key or value. A
    train config is then narrowed to the plug-ins it chose (`narrow`; `explicit`: the keys the
    command line set)."""
    base = OmegaConf.structured(schema)
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        # as plain data: a config composed (or unpickled, in a launcher's worker) against another
        # derivation of the schema carries that class, which a merge would refuse
        plain = OmegaConf.create(OmegaConf.to_container(plain, resolve=False))
        merged = OmegaConf.merge(base, plain)
        if getattr(schema, "__kdmtl_train__", False):
            merged = narrow(merged, explicit)
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
    their defaults, so Hydra itself rejects bad keys and types while composing (--cfg job too).
    Call it after the plug-ins are loaded (kdmtl_cli/plugins.py): the train schema is derived
    from them."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="kdmtl_train_schema", node=train_schema())
    store.store(name="kdmtl_eval_schema", node=EvalConfig)


# -- the schema derived from the plug-ins ------------------------------------------------------
#
# A plug-in declares the keys it reads as a dataclass registered with it (`Registry.register(name,
# settings=...)`). The schema Hydra composes against is the union: a section's common keys plus
# every plug-in's keys (`data_schema()`...), so any plug-in's keys can be set. `validate` then
# narrows each section to the chosen plug-in (`data.name`, `student.arch`, `weighting.name`,
# `tasks.<t>.kind`): a key of another plug-in set away from its default is refused with the
# chosen plug-in's keys listed, and the run's config holds exactly the chosen plug-in's keys (so
# adding a plug-in never changes another run's config, its hash or its teacher-cache key).

# TrainConfig field -> (common keys, registry "module:NAME", the key naming the plug-in)
_SECTIONS = {
    "data": (DataCommon, "kdmtl_cli.data:DATASETS", "name"),
    "tasks": (TaskCommon, "kdmtl_cli.tasks:TASK_KINDS", "kind"),
    "teacher": (TeacherCommon, "kdmtl_cli.models:TRUNKS", "arch"),
    "student": (ModelCommon, "kdmtl_cli.models:TRUNKS", "arch"),
    "weighting": (WeightingCommon, "kdmtl_cli.weighting:WEIGHTINGS", "name"),
}
_METHODS = "kdmtl_cli.distill:KD_METHODS"


def _registry(path: str):
    import importlib

    from kdmtl_cli.plugins import load_builtin

    load_builtin()
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _generation() -> int:
    from kdmtl_cli.registry import Registry

    return Registry.generation


def _copy_field(f: dataclasses.Field, hint) -> tuple:
    if f.default is not dataclasses.MISSING:
        return (f.name, hint, field(default=f.default, metadata=f.metadata))
    return (f.name, hint, field(default_factory=f.default_factory, metadata=f.metadata))


def _default(f: dataclasses.Field):
    """A field's default as plain data (what OmegaConf.to_container gives for it)."""
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if dataclasses.is_dataclass(value):
        return OmegaConf.to_container(OmegaConf.structured(value))
    return value


def _plugin_fields(registry, names) -> Dict[str, tuple]:
    """{key: (field, type hint, owner)} of the settings of the plug-ins `names`. A key two plug-ins
    declare with different types is a programming error; with different defaults the union has
    no default (MISSING): each plug-in's own default applies once it is chosen."""
    out: Dict[str, tuple] = {}
    for name in names:
        settings = registry.settings(name)
        if settings is None:
            continue
        hints = typing.get_type_hints(settings)
        for f in dataclasses.fields(settings):
            if f.name not in out:
                out[f.name] = (f, hints[f.name], name)
                continue
            first, hint, owner = out[f.name]
            if hint != hints[f.name]:
                raise TypeError(f"{registry.kind}s '{owner}' and '{name}' declare '{f.name}' with different "
                                f"types ({hint} and {hints[f.name]}); rename one")
            if first is not f and _default(first) != _default(f):
                out[f.name] = (field(default=MISSING, metadata=first.metadata), hint, "")
                out[f.name][0].name = f.name
    return out


def _section(base: type, registry, names, suffix: str) -> type:
    """`base` plus the settings of the plug-ins `names` (cached per plug-in set)."""
    key = (base, registry.kind, tuple(names), _generation())
    if key in _DERIVED:
        return _DERIVED[key]
    common = {f.name for f in dataclasses.fields(base)}
    extra = []
    for name, (f, hint, owner) in _plugin_fields(registry, names).items():
        if name in common:
            raise TypeError(f"{registry.kind} '{owner}' declares '{name}', a key every {registry.kind} has; rename it")
        extra.append(_copy_field(f, hint))
    cls = dataclasses.make_dataclass(base.__name__.replace("Common", "Config") + suffix, extra, bases=(base,))
    cls.__module__ = __name__
    _DERIVED[key] = cls
    return cls


_DERIVED: Dict[tuple, type] = {}


def section_schema(section: str, chosen: Optional[str] = "*") -> type:
    """The schema of one plug-in section: the union over every plug-in (chosen="*"), or the
    common keys plus the settings of the plug-in `chosen` (None: no plug-in's settings)."""
    base, path, _ = _SECTIONS[section]
    registry = _registry(path)
    if chosen == "*":
        return _section(base, registry, registry.names(), "")
    return _section(base, registry, [chosen] if chosen is not None else [], f"_{chosen}")


def loss_schema() -> type:
    """LossCommon plus one optional section per distillation method, typed by its settings."""
    registry = _registry(_METHODS)
    key = ("loss", tuple(registry.names()), _generation())
    if key not in _DERIVED:
        sections = [(name, Optional[registry.settings(name)], field(default=None))
                    for name in registry.names() if registry.settings(name) is not None]
        cls = dataclasses.make_dataclass("LossConfig", sections, bases=(LossCommon,))
        cls.__module__ = __name__
        _DERIVED[key] = cls
    return _DERIVED[key]


def train_schema(chosen: Optional[Dict[str, Optional[str]]] = None) -> type:
    """TrainCommon with its plug-in sections derived: the union of every plug-in (for Hydra's
    composition), or narrowed to the plug-ins `chosen` ({section: name}; tasks stay the union)."""
    chosen = dict(chosen or {})
    key = ("train", tuple(sorted(chosen.items(), key=str)), _generation())
    if key in _DERIVED:
        return _DERIVED[key]
    types = {section: section_schema(section, chosen.get(section, "*")) for section in _SECTIONS}
    fields_ = []
    hints = typing.get_type_hints(TrainCommon)
    for f in dataclasses.fields(TrainCommon):
        if f.name == "tasks":
            task_schema = types["tasks"]
            fields_.append((f.name, Dict[str, task_schema], field(default_factory=dict)))
        elif f.name in types:
            fields_.append((f.name, types[f.name], field(default_factory=types[f.name])))
        elif f.name == "loss":
            fields_.append((f.name, loss_schema(), field(default_factory=loss_schema())))
        else:
            fields_.append(_copy_field(f, hints[f.name]))
    cls = dataclasses.make_dataclass("TrainConfig", fields_)
    cls.__module__ = __name__
    cls.__kdmtl_train__ = True
    _DERIVED[key] = cls
    return cls


def _chosen(section: str, node: dict) -> Optional[str]:
    """The plug-in a section's node names (None: an external trunk or model replaces `arch`)."""
    _, path, selector = _SECTIONS[section]
    if section in ("student", "teacher") and (node.get("trunk") or node.get("model")):
        return None
    name = node.get(selector)
    registry = _registry(path)
    if name not in registry:
        where = f"{section}.{selector}" if section != "tasks" else f"tasks.<task>.{selector}"
        raise KdmtlError(f"unknown {registry.kind} '{name}' in {where}; choose one of: {', '.join(registry.names())} "
                         "(a plug-in of your own: its .py file goes in the directory given to --config-dir)")
    return name


def _drop_foreign(section: str, where: str, node: dict, chosen: Optional[str], explicit) -> None:
    """Remove from `node` the keys of plug-ins other than `chosen`. One set on the command line
    (`explicit`) away from its default is refused, listing the chosen plug-in's keys; one from a
    YAML file is dropped (an option may inherit another's keys: teacher=segnet from multitask)."""
    union = section_schema(section)
    own = {f.name for f in dataclasses.fields(section_schema(section, chosen))}
    for f in dataclasses.fields(union):
        if f.name in own or f.name not in node:
            continue
        value = node.pop(f.name)
        unset = value == "???" if f.default is MISSING else value == _default(f)
        if not unset and f"{where}.{f.name}" in explicit:
            _, path, selector = _SECTIONS[section]
            named = f"{selector}={chosen}" if chosen is not None else "trunk/model"
            raise KdmtlError(f"{where}.{f.name} is not a setting of {where} {named}; its keys: "
                             f"{', '.join(sorted(own))} (remove {where}.{f.name}, or choose the "
                             f"{_registry(path).kind} it belongs to)")


def narrow(merged: DictConfig, explicit=()) -> DictConfig:
    """A validated train config (union schema) narrowed to the plug-ins it chose; `explicit`:
    the keys the command line set (`resume.touched_keys`)."""
    explicit = set(explicit)
    plain = OmegaConf.to_container(merged, resolve=False)
    chosen = {}
    for section in _SECTIONS:
        if section == "tasks":
            for name, node in (plain.get("tasks") or {}).items():
                _drop_foreign("tasks", f"tasks.{name}", node, _chosen("tasks", node), explicit)
            continue
        chosen[section] = _chosen(section, plain[section])
        _drop_foreign(section, section, plain[section], chosen[section], explicit)
    return OmegaConf.merge(OmegaConf.structured(train_schema(chosen)), plain)


_NAMES = {"TrainConfig": lambda: train_schema(), "DataConfig": lambda: section_schema("data"),
          "TaskConfig": lambda: section_schema("tasks"), "ModelConfig": lambda: section_schema("student"),
          "TeacherConfig": lambda: section_schema("teacher"), "WeightingConfig": lambda: section_schema("weighting"),
          "LossConfig": loss_schema}
_METHOD_SETTINGS = {"KDConfig": "kd", "DKDConfig": "dkd", "FitNetConfig": "fitnet", "ATConfig": "at",
                    "KD4MTLConfig": "kd4mtl", "BAMConfig": "bam"}


def __getattr__(name: str):
    """`schema.TrainConfig`, `schema.ModelConfig`...: the schemas derived from the plug-ins loaded
    now (the union of every plug-in's settings); `schema.KDConfig`...: a method's settings."""
    if name in _NAMES:
        return _NAMES[name]()
    if name in _METHOD_SETTINGS:
        return _registry(_METHODS).settings(_METHOD_SETTINGS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
