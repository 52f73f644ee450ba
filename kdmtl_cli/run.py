"""One training run, start to finish (called by `kdmtl train` for each job)."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from kdmtl_cli.build import make_loader, model_meta
from kdmtl_cli.data import build_data
from kdmtl_cli.distill import build_methods, method_names
from kdmtl_cli.distill.objective import Objective, check_student_modules, ensemble_groups, preflight
from kdmtl_cli.distill.weights import per_task_weights
from kdmtl_cli.engine.checkpoint import atomic_write_text, discard_partial_writes, load_checkpoint
from kdmtl_cli.engine.init_stage import check_init_stages
from kdmtl_cli.resume import recorded_config
import torch

from kdmtl_cli import provenance, search
from kdmtl_cli.engine import distributed, preemption, run_clock, teacher_exact, teacher_outputs
from kdmtl_cli.engine.efficiency import measure
from kdmtl_cli.engine.hardware import setup_hardware
from kdmtl_cli.engine.logging import MetricsLog, NullLog, say
from kdmtl_cli.engine.optim import build_optimizer, build_scheduler, check_optimizer
from kdmtl_cli.engine.seeding import seed_everything
from kdmtl_cli.engine.trainer import Trainer, average_tests, check_monitor, effective_monitor, evaluate
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import build_model, without_init_only
from kdmtl_cli.models import describe as describe_model
from kdmtl_cli.report import baselines
from kdmtl_cli.report.delta_m import CONVENTIONS, delta_m_of_run
from kdmtl_cli.summary import comparison_rows, markdown, print_table
from kdmtl_cli.tasks import build_tasks, task_signature
from kdmtl_cli.teachers import member_configs, prepare_teacher, teacher_skeleton, teacher_task_names
from kdmtl_cli.weighting import WEIGHTINGS, build_weighting


def _write_config(cfg: DictConfig, run_dir: Path, resume: bool) -> str:
    """config.yaml, written when the run starts (a resumed run keeps its own); returns its text,
    which every checkpoint records so that a later edit of the file is noticed on resume."""
    path = run_dir / "config.yaml"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            if (run_dir / "checkpoints" / "last.pt").exists():
                raise KdmtlError(f"{run_dir} already holds a run's checkpoints; pass resume={run_dir} "
                                 "to continue it, or choose another hydra.run.dir")
            discard_partial_writes(run_dir / "checkpoints")   # a first checkpoint write killed halfway
            atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), path)
        return path.read_text()
    except OSError as err:
        raise KdmtlError(f"cannot write to the output directory {run_dir} ({err.strerror}); "
                         "choose a writable one with hydra.run.dir=PATH") from None


def _hparams(cfg: DictConfig) -> dict:
    """Every setting of the resolved config for TensorBoard's HParams view, nested keys flattened
    with dots (`loss.kd.temperature`), so whichever keys a sweep varies are there. Values are
    of the types its `hparams()` records: numbers and strings as they are; booleans as
    "true"/"false" (it would store them as 1.0/0.0); None as "null" (it would drop the key, so a
    setting unset in one run and set in another would be missing from the first); lists as
    JSON text."""
    from kdmtl_cli.resume import flatten_keys

    def value_of(value):
        if isinstance(value, bool) or value is None:
            return json.dumps(value)
        if isinstance(value, (int, float, str)):
            return value
        return json.dumps(value, default=str)

    return {key: value_of(value) for key, value in flatten_keys(OmegaConf.to_container(cfg, resolve=True)).items()}


def _check_delta_m(delta_cfg, tasks):
    """Load the Δm baseline and check it covers every main task before any training."""
    if delta_cfg.convention not in CONVENTIONS:
        raise KdmtlError(f"delta_m.convention must be one of {', '.join(CONVENTIONS)} (got '{delta_cfg.convention}')")
    if delta_cfg.record:
        baselines.check_record_target(delta_cfg.record, tasks)
    if not delta_cfg.baseline:
        return None
    baseline = baselines.load_baseline(delta_cfg.baseline)
    baselines.check_covers(baseline, tasks)
    return baseline


def _delta_rows(results: dict, convention: str):
    key = f"test/delta_m/{convention}"
    if key not in results:
        return None
    return (f"Δm% ({convention}) ↑", results.get(f"teacher/{key}"), results[key])


def _teacher_output_cache(cfg, teacher, train_loader, hardware, data, tasks):
    """Open or build the teacher-output cache and make the train loader replay its views (or,
    for `exact`, open the store the training steps fill)."""
    task_kinds = {n: t.kind.name for n, t in tasks.items()}
    if cfg.teacher.cache == "exact":
        return teacher_exact.open_exact(cache_dir=cfg.cache_dir, teacher=teacher, loader=train_loader,
                                        hardware=hardware, teacher_cfg=cfg.teacher, data=data, task_kinds=task_kinds,
                                        epochs=int(cfg.optim.epochs), say=_say(cfg))
    views = teacher_outputs.plan_views(str(cfg.teacher.cache), int(cfg.teacher.cache_views),
                                       train_loader.num_samples, hflip=train_loader.hflip,
                                       crop_padding=train_loader.crop_padding, seed=cfg.seed, say=_say(cfg),
                                       resized_crop=train_loader.resized_crop)
    cache = teacher_outputs.open_or_build(
        cache_dir=cfg.cache_dir, teacher=teacher, loader=train_loader, hardware=hardware, teacher_cfg=cfg.teacher,
        data=data, views=views, task_kinds=task_kinds, seed=cfg.seed,
        say=_say(cfg), progress_mode=cfg.log.progress)
    train_loader.views = views
    return cache


def _teacher_test(cfg, teacher, test_loader, teacher_tasks, hardware, data) -> dict:
    """The frozen teacher's test metrics: evaluated once per (weights, test data, evaluation
    settings) and read back from the cache afterwards (engine/teacher_cache.py)."""
    import kdmtl_cli
    from kdmtl_cli.engine import teacher_cache

    evaluation = {
        "kdmtl": kdmtl_cli.__version__, "torch": torch.__version__, "device": hardware.device.type,
        "precision": hardware.precision, "channels_last": hardware.channels_last,
        "data": {"name": data.name, "fingerprint": data.fingerprint, "test_size": data.size("test"),
                 "mean": list(data.mean), "std": list(data.std)},
        "batch_size": test_loader.batch_size, "limit_batches": test_loader.limit_batches,
        "tasks": {name: OmegaConf.to_container(cfg.tasks[name], resolve=True) for name in teacher_tasks},
        "metric_reduction": str(cfg.test.get("metric_reduction", "split")),
    }
    key = teacher_cache.test_metrics_key(teacher_outputs.weights_digest(teacher), evaluation)
    metrics = teacher_cache.read_test_metrics(cfg.cache_dir, key)
    if metrics is None:
        metrics = evaluate(teacher, test_loader, teacher_tasks, hardware, "test")
        teacher_cache.write_test_metrics(cfg.cache_dir, key, metrics, evaluation)
    return metrics


PREEMPTED = "PREEMPTED"                      # marker: the run stopped on a signal; the same command resumes it


def _overrides() -> list:
    """The command-line overrides of this job (a sweep point's own values), when run by Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


def _panel(cfg, val_batch, tasks, data, teacher):
    """Validation images with ground truth, teacher and student predictions, for TensorBoard."""
    if not cfg.log.tensorboard or not any(t.kind.dense for t in tasks.values()):
        return None
    from kdmtl_cli.engine.panel import ValidationPanel

    return ValidationPanel(val_batch, tasks, data.mean, data.std, teacher)


def _main_first(ranks, make):
    """Rank 0 makes it first (training a teacher, generating data, building a cache), then the
    other ranks make theirs, which finds rank 0's result in the cache."""
    if ranks.is_main:
        result = make()
        distributed.barrier(ranks)
        return result
    distributed.barrier(ranks)
    return make()


def _say(cfg):
    """The run's status-message function (engine.logging.say at its log.progress)."""
    return functools.partial(say, cfg.log.progress)


def _follow_weights_norm(cfg) -> None:
    """Input normalisation follows pretrained weights: the student's weights file, else that of a
    teacher trained here from one (ImageNet mean/std for ImageNet weights), replaces data.mean/std
    in the run's config before it is saved (so config.yaml, the checkpoints and `kdmtl eval` agree).
    A teacher loaded from a kdmtl checkpoint keeps its own, through teachers.Renormalize."""
    from kdmtl_cli.models import weights_norm

    sources = [("student", cfg.student)]
    if not cfg.teacher.checkpoint and not cfg.teacher.checkpoints and method_names(cfg.loss):
        sources.append(("teacher", cfg.teacher))
    for who, node in sources:
        norm = weights_norm(node)
        if norm is None:
            continue
        if [list(cfg.data.mean), list(cfg.data.std)] != [norm["mean"], norm["std"]]:
            _say(cfg)(f"input normalisation: mean {norm['mean']}, std {norm['std']}, as the weights of the {who} "
                      f"({node.weights}) expect (instead of data.mean/std)")
            cfg.data.mean, cfg.data.std = list(norm["mean"]), list(norm["std"])
        return


def run_training(cfg: DictConfig, run_dir: Path, resume: bool = False) -> Optional[float]:
    """The whole run, stoppable by SIGTERM / SIGUSR1 in every phase (engine/preemption.py): the
    work in progress is saved, PREEMPTED is written, and the same command continues it."""
    ranks = distributed.from_env()

    def record_stop(signal_name: str, message: str) -> None:
        if ranks.is_main:
            atomic_write_text(json.dumps({"signal": signal_name, "message": message}), run_dir / PREEMPTED)

    with preemption.stop_on_signals(record_stop):
        return _run_training(cfg, run_dir, resume, ranks)


def _run_training(cfg: DictConfig, run_dir: Path, resume: bool, ranks) -> Optional[float]:
    started = time.perf_counter()
    run_clock.forget_all()
    if not resume and (run_dir / PREEMPTED).exists() and (run_dir / "checkpoints" / "last.pt").exists():
        resume = True    # a job requeued by its launcher (submitit) after a stop signal: continue it
    if ranks.is_main:
        (run_dir / PREEMPTED).unlink(missing_ok=True)   # continued now; a new stop writes it again
    config_text = ""
    _follow_weights_norm(cfg)
    if not ranks.is_main:      # one voice and one writer: rank 0
        cfg.log.progress, cfg.log.tensorboard = "none", False
    else:
        config_text = _write_config(cfg, run_dir, resume)
    seed_everything(cfg.seed)
    hardware = setup_hardware(cfg.hardware)
    if ranks.active:
        if hardware.device.type == "cuda":
            hardware.device = torch.device(f"cuda:{ranks.local_rank}")
            torch.cuda.set_device(hardware.device)
        distributed.init(ranks, hardware.device)
        distributed.check_batch(cfg.data.batch_size, ranks)
        if WEIGHTINGS.get(cfg.weighting.name).gradient_based:
            loss_based = [n for n in WEIGHTINGS.names() if not WEIGHTINGS.get(n).gradient_based]
            raise KdmtlError(f"weighting={cfg.weighting.name} is not supported with several processes yet "
                             f"(its per-task gradients are per rank); use {', '.join(loss_based)}")
    data = _main_first(ranks, lambda: build_data(cfg.data))   # generated data sets are cached once
    origin, code_diff = {}, ""   # rank 0 writes the run's files: only it asks git and torch where the run comes from
    if ranks.is_main:            # the code as it starts; its diff is written with the results
        origin, code_diff = provenance.collect(OmegaConf.to_container(cfg, resolve=True), hardware.device,
                                               data.fingerprint)
    preemption.check("while the data was prepared")
    tasks = build_tasks(cfg.tasks, data.targets)
    teacher_tasks = teacher_task_names(cfg, tasks)
    ensemble = cfg.teacher.mode == "ensemble"
    if ensemble:
        member_configs(cfg)   # each teacher's settings, checked before any work
    methods = build_methods(cfg.loss, tasks, teacher_tasks,   # checks each method's settings
                            members=len(cfg.teacher.members) if ensemble else 0)
    for method in methods:
        method.bind_data(data)
    check_init_stages(methods, ranks)   # before any teacher is trained
    per_task_weights(cfg.loss.task_weight, tasks, "loss.task_weight")  # checked before any training
    has_val = data.size("val") > 0        # data.val_size=0: the whole training split, no selection on val
    check_monitor(cfg.checkpoint.monitor, tasks, has_val)
    monitor = effective_monitor(cfg.checkpoint.monitor, has_val)
    balance = bool(cfg.teacher.balance) and ensemble and bool(methods)   # teachers as the weighting's groups
    weighting = build_weighting(cfg.weighting, list(tasks) + ensemble_groups(methods, balance),
                                seed=cfg.seed).to(hardware.device)
    baseline = _check_delta_m(cfg.delta_m, tasks)

    # The student is built before any teacher is trained, so a bad student setting fails in
    # a second, not after the teacher's training.
    student = hardware.prepare_model(build_model(cfg.student, tasks))
    check_optimizer(cfg.optim)
    check_student_modules(methods, student)
    train_loader = make_loader(data, "train", tasks, cfg, hardware, train=True, limit=cfg.limit_train_batches)
    train_loader.shard = (ranks.rank, ranks.world)
    run_clock.expect("student", int(cfg.optim.epochs) * len(train_loader))   # counted while a teacher trains
    val_loader = make_loader(data, "val", tasks, cfg, hardware, train=False, limit=cfg.limit_eval_batches) \
        if has_val else None
    test_loader = make_loader(data, "test", tasks, cfg, hardware, train=False, limit=cfg.limit_eval_batches)
    # Sizes the methods' learned parts (and the TensorBoard panel's images): the first validation
    # batch, or without a validation split the first training batch without augmentation (never test data).
    probe = next(iter(val_loader if has_val else make_loader(data, "train", tasks, cfg, hardware, train=False,
                                                              limit=1)))
    if not has_val:
        _say(cfg)(f"no validation split (data.val_size=0): training on all {data.size('train')} training "
                  f"images; " + ("the last epoch is kept (best = last)" if monitor == "last" else
                                 f"best epoch by {monitor}") + ("; a teacher trained here keeps its last epoch"
                                                                 if methods else ""))

    if methods:   # feature names and shapes, on untrained models: fails before any teacher is trained
        preflight(methods, build_model(without_init_only(cfg.student), tasks),
                  teacher_skeleton(cfg, tasks), probe)
    teacher, teacher_info = None, {}
    if methods:
        preemption.check("before the teacher was prepared")
        teacher, teacher_info = _main_first(ranks, lambda: prepare_teacher(cfg, tasks, data, hardware, run_dir))
        provenance.with_teacher(origin, teacher_info)
        preemption.check("after the teacher was prepared (it is cached)")
    # Reseed: training continues the same whether the teacher was trained here or loaded.
    seed_everything(cfg.seed)
    objective = Objective(tasks, cfg.loss.task_weight, methods, teacher, balance=balance)
    first_val = probe
    objective.setup(student, first_val, hardware.device)
    if teacher is not None and cfg.teacher.cache != "off":
        objective.cache = _main_first(ranks, lambda: _teacher_output_cache(cfg, teacher, train_loader, hardware,
                                                                           data, tasks))
        seed_everything(cfg.seed)   # building the cache or not leaves training the same
    elif cfg.teacher.cache != "off":
        _say(cfg)(f"teacher.cache={cfg.teacher.cache} is not used: no distillation method runs (loss=none)")
    # RepDistiller's init stage of two-stage methods (ab, ft, fsp), skipped when resuming from a checkpoint
    from kdmtl_cli.engine.init_stage import run_init_stages

    run_init_stages(objective, student, train_loader, hardware, cfg, run_dir, resume, ranks)
    optimizer = build_optimizer([{"params": list(student.parameters())}, *objective.param_groups(cfg.optim.lr),
                                 *weighting.param_groups(cfg.optim.lr)], cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, len(train_loader))
    log = MetricsLog(run_dir, cfg.log.tensorboard) if ranks.is_main else NullLog()
    meta = model_meta(cfg.student, task_signature(tasks), data)
    trainer = Trainer(model=student, objective=objective, tasks=tasks, optimizer=optimizer, scheduler=scheduler,
                      hardware=hardware, train_loader=train_loader, val_loader=val_loader,
                      epochs=cfg.optim.epochs, checkpoint_dir=run_dir / "checkpoints", log=log,
                      progress_mode=cfg.log.progress, label="student", monitor=cfg.checkpoint.monitor,
                      test_loader=test_loader, test_last_epochs=cfg.test.average_last_epochs,
                      mode=cfg.checkpoint.mode, grad_clip_norm=cfg.optim.grad_clip_norm,
                      log_every_n_steps=cfg.log.every_n_steps, stop_after_epoch=cfg.stop_after_epoch,
                      checkpoint_extra={"model_meta": meta, **recorded_config(config_text)}, weighting=weighting,
                      grad_norms_every_n_steps=cfg.log.grad_norms_every_n_steps, ranks=ranks,
                      panel=_panel(cfg, first_val, tasks, data, teacher) if ranks.is_main and has_val else None)
    if resume:
        trainer.resume_from_last()
    try:
        state = trainer.fit()
    except BaseException:
        log.close()           # the TensorBoard events so far reach the disk
        raise
    finally:
        if objective.cache is not None:
            objective.cache.close()   # the next job of a sweep (same process) may write the exact store
    distributed.barrier(ranks)        # rank 0's checkpoints are written
    if state.epoch < cfg.optim.epochs or not ranks.is_main:
        log.close()
        distributed.shutdown(ranks)
        return state.best_value
    preemption.check("after the last epoch, before the test (the checkpoints are written)")

    # Test once, with the selected checkpoint (best on validation, by training loss, or the last epoch).
    student.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"])
    test_metrics = evaluate(student, test_loader, tasks, hardware, "test")
    teacher_metrics, teacher_cost, student_cost = None, None, None
    if teacher is not None:
        teacher_metrics = _teacher_test(cfg, teacher, test_loader, {n: tasks[n] for n in teacher_tasks}, hardware, data)
    if cfg.log.efficiency:
        sample = next(iter(test_loader))["image"]
        student_cost = measure(student, sample, hardware)
        teacher_cost = measure(teacher, sample, hardware) if teacher is not None else None
    # test.average_last_epochs=N: the mean of the tests after each of the last N epochs (MTAN / Nash-MTL / CAGrad)
    mean_tests = average_tests(state.test_history, cfg.test.average_last_epochs, state.epoch)
    results = {
        "type": "final", "epoch": state.epoch, "best_epoch": state.best_epoch,
        "monitor": monitor, "best_value": state.best_value,
        **{k: v for k, v in state.best_metrics.items()}, **test_metrics,
        **mean_tests, **delta_m_of_run(baseline, data, tasks, mean_tests, f"test_mean_last{cfg.test.average_last_epochs}"),
        **({f"teacher/{k}": v for k, v in teacher_metrics.items()} if teacher_metrics else {}),
        **({f"student/{k}": v for k, v in student_cost.items()} if student_cost else {}),
        # the methods' learned parts (regressors, embeddings, ABFs...): trained with the student, not exported with it
        "student/distill_params": sum(p.numel() for p in objective.modules.parameters()),
        **({f"teacher/{k}": v for k, v in teacher_cost.items()} if teacher_cost else {}),
        **delta_m_of_run(baseline, data, tasks, test_metrics, "test"),
        **delta_m_of_run(baseline, data, tasks, teacher_metrics, "test", who="teacher/"),
        "wall_time_s": time.perf_counter() - started,
    }
    log.write(results)
    log.scalars({k: v for k, v in results.items() if k.startswith(("test/", "teacher/test/", "test_mean_last"))},
                state.global_step)
    log.hparams(_hparams(cfg), {k: v for k, v in results.items() if k.startswith("test/")})
    log.text("provenance", provenance.markdown(origin), state.global_step)
    log.close()
    if cfg.delta_m.record:
        baselines.record(cfg.delta_m.record, tasks, test_metrics, data,
                         {"run_dir": str(run_dir), "seed": int(cfg.seed),
                          "student": describe_model(cfg.student)})
    rows = comparison_rows(tasks, "test", test_metrics, teacher_metrics, student_cost, teacher_cost,
                           delta=_delta_rows(results, cfg.delta_m.convention))
    title = f"kdmtl train: {'+'.join(method_names(cfg.loss)) or 'no distillation'} | test split | " + (f"last epoch ({state.epoch})" if monitor == "last" else f"best epoch {state.best_epoch} by {monitor}")
    header = [f"- run dir: `{run_dir}`", f"- teacher: {teacher_info.get('source', 'none')}",
              f"- student: {describe_model(cfg.student)}"
              + (f"; distillation modules: {results['student/distill_params']:,} parameters, trained with it"
                 if results["student/distill_params"] else ""),
              f"- data: {cfg.data.name} ({data.size('train')} train / {data.size('val')} val / "
              f"{data.size('test')} test)", f"- epochs: {state.epoch}, seed {cfg.seed}",
              f"- weighting: {cfg.weighting.name}",
              f"- Δm baseline: {results.get('delta_m/baseline') or 'none (set delta_m.baseline=FILE)'}"
              + (f" — not computed: {results['delta_m/skipped']}" if results.get('delta_m/skipped') else ""),
              f"- wall time: {results['wall_time_s']:.1f} s"]
    if mean_tests:
        header.append(f"- test, mean of the last {cfg.test.average_last_epochs} epochs: " + ", ".join(
            f"{k.split('/', 1)[1]} {v:.4f}" for k, v in mean_tests.items() if k.split("/")[1] not in ("task", "loss")))
    atomic_write_text(markdown(title, rows, header) + "\n## Provenance\n\n" + provenance.markdown(origin),
                      run_dir / "summary.md")
    provenance.write_patch(run_dir, code_diff)   # beside results.json; a refused run leaves none
    # Machine-readable for sweep aggregation: what this job changed, and its best / last / final metrics.
    # Written last: results.json marks a finished run (engine/run_dir.state), so every other file exists.
    best = {"epoch": state.best_epoch, **state.best_metrics}
    atomic_write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True), "overrides": _overrides(),
                                  "results": results, "best": best,
                                  # what a search (kdmtl_cli/search.py) optimises, in search.objectives' order
                                  "objectives": search.values(search.objectives(cfg), results, best),
                                  "last": {"epoch": state.epoch, **state.last_metrics},
                                  "teacher": teacher_info, "provenance": origin}, indent=2), run_dir / "results.json")
    from kdmtl_cli.report import sweep

    # A sweep's job says one line (the sweep ends with a table of all jobs) and keeps its full table in its log.
    job_line = sweep.job_line(run_dir, results, cfg) if sweep.in_sweep() else None
    print_table(title, rows, "none" if job_line else cfg.log.progress)
    if results.get("delta_m/skipped"):
        _say(cfg)(f"Δm not computed: {results['delta_m/skipped']}")
    _say(cfg)(job_line or f"run dir: {run_dir}")
    distributed.shutdown(ranks)
    return state.best_value
