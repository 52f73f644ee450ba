"""The training loop: batch -> outputs -> named loss terms -> step; validate every
epoch; checkpoint `last` and `best` (by a validation metric, the epoch's mean training loss,
or simply the last epoch) atomically; resume exactly.

Without a validation split (`val_loader=None`, data.val_size=0) nothing is validated and
`best` is the last epoch. `test_loader` with `test_last_epochs=N`: the test split is also
evaluated after each of the last N epochs (written as `epoch_test/...` in the epoch record and
kept in the checkpoint, so a resumed run still has them); nothing is selected on them.

One loop trains teachers and students alike; what is optimised lives in the
`objective` (kdmtl_cli/distill/objective.py), so this file never knows about KD.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import OmegaConf

from kdmtl_cli.engine import preemption
from kdmtl_cli.engine.checkpoint import discard_partial_writes, load_checkpoint
from kdmtl_cli.engine.checkpoint import save_checkpoint as _save_checkpoint
from kdmtl_cli.engine.distributed import Ranks, average_gradients, mean_across_ranks
from kdmtl_cli.engine.hardware import Hardware
from kdmtl_cli.engine.logging import MetricsLog, Progress, duration, say
from kdmtl_cli.engine.seeding import rng_state, set_rng_state
from kdmtl_cli.errors import KdmtlError, Preempted
from kdmtl_cli.weighting import build_weighting, weighted_backward


def validation_metric_names(tasks) -> list:
    names = ["val/loss/task"] + [f"val/task/{t}" for t in tasks]
    names += [f"val/{t}/{m}" for t, task in tasks.items() for m in task.kind.higher_is_better]
    return sorted(names)


DEFAULT_MONITOR = "val/loss/task"
LAST = "last"            # checkpoint.monitor=last: keep the last epoch
EPOCH_TEST = "epoch_test/"   # per-epoch test metrics of the last N epochs (test.average_last_epochs)


def training_metric_names(tasks) -> list:
    """Epoch-mean training losses a checkpoint can be selected by (KD4MTL: lowest training loss)."""
    return ["train/loss/task"] + [f"train/task/{t}" for t in tasks]


def check_monitor(monitor: str, tasks, has_val: bool = True) -> None:
    """Fail at start, not after an epoch, when the selection metric does not exist, or needs
    a validation split the run does not have (the default val/loss/task then means `last`)."""
    valid = validation_metric_names(tasks) + training_metric_names(tasks) + [LAST]
    if monitor not in valid:
        raise KdmtlError(f"checkpoint.monitor '{monitor}' is not a validation metric; "
                         f"choose one of: {', '.join(valid)}")
    if not has_val and monitor.startswith("val/") and monitor != DEFAULT_MONITOR:
        raise KdmtlError(f"checkpoint.monitor={monitor} selects on the validation split, but data.val_size=0 "
                         "leaves none; set checkpoint.monitor=last (or train/loss/task), or data.val_size >= 1")


def effective_monitor(monitor: str, has_val: bool) -> str:
    """The monitor a run uses: without a validation split, the default val/loss/task is `last`."""
    return LAST if not has_val and monitor.startswith("val/") else monitor


def average_tests(test_history: Dict[int, Dict[str, float]], n: int, last_epoch: int) -> Dict[str, float]:
    """`test_mean_last<n>/<task>/<metric>`: each test metric's mean over epochs last_epoch-n+1 ..
    last_epoch (MTAN / Nash-MTL / CAGrad report this); {} when n is 0."""
    if not n:
        return {}
    epochs = [e for e in range(last_epoch - n + 1, last_epoch + 1) if e >= 1]
    missing = [e for e in epochs if e not in test_history]
    if missing:
        raise KdmtlError(f"test.average_last_epochs={n}: no test metrics recorded for epoch(s) "
                         f"{', '.join(map(str, missing))} (was the run resumed with another setting?)")
    keys = test_history[epochs[-1]].keys()
    return {f"test_mean_last{n}/" + key.split("/", 1)[1]: sum(test_history[e][key] for e in epochs) / len(epochs)
            for key in keys}


def _short(value: float) -> str:
    """Four significant digits for an epoch line (metrics.jsonl keeps every digit)."""
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:#.4g}".rstrip(".")     # 5.500, not 5.5: the columns of successive lines align
    return f"{value:.3e}"


class NonFiniteLoss(KdmtlError):
    pass


def metric_direction(name: str, tasks) -> str:
    """'max' when higher is better, 'min' otherwise (losses and errors)."""
    parts = name.split("/")
    if len(parts) == 3 and parts[1] in tasks:
        return "max" if tasks[parts[1]].kind.higher_is_better.get(parts[2], False) else "min"
    return "min"


def _no_dist() -> bool:
    return False


@torch.no_grad()
def evaluate(model, loader, tasks, hardware: Hardware, split: str) -> Dict[str, float]:
    """Task losses and every task metric over a whole split, as {split/...: float} (a task with
    metric_reduction=batch_mean averages its metrics' per-batch values over the batches)."""
    model.eval()
    metrics = {name: {m: metric.to(hardware.device) for m, metric in task.metrics().items()}
               for name, task in tasks.items()}
    for per_task in metrics.values():
        for metric in per_task.values():
            # Under data-parallel training every rank evaluates the whole split: no syncing.
            metric.sync_on_compute = False
            metric.distributed_available_fn = _no_dist
    sums: Dict[str, float] = {}
    count = 0
    for batch in loader:
        with hardware.autocast():
            out = model(hardware.to_input(batch["image"]))
        terms = {f"task/{name}": task.kind.loss(out["outputs"][name], batch["targets"][task.target])
                 for name, task in tasks.items()}
        n = batch["image"].shape[0]
        count += n
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        for name, task in tasks.items():
            pred, target = task.kind.prepare_for_metrics(out["outputs"][name], batch["targets"][task.target])
            for metric in metrics[name].values():
                metric.update(pred, target)
    result = {f"{split}/{key}": value / max(count, 1) for key, value in sums.items()}
    # Auxiliary tasks are reported on their own but do not count towards the selection loss.
    result[f"{split}/loss/task"] = sum(result[f"{split}/task/{name}"] for name, task in tasks.items()
                                       if not getattr(task, "auxiliary", False))
    for name, per_task in metrics.items():
        for metric_name, metric in per_task.items():
            result[f"{split}/{name}/{metric_name}"] = float(metric.compute())
    return result


@dataclass
class TrainState:
    epoch: int = 0                 # epochs completed
    global_step: int = 0
    best_value: Optional[float] = None
    best_epoch: Optional[int] = None
    best_metrics: Dict[str, float] = field(default_factory=dict)
    last_metrics: Dict[str, float] = field(default_factory=dict)   # validation metrics of the last epoch
    test_history: Dict[int, Dict[str, float]] = field(default_factory=dict)   # epoch -> test metrics (last N)


class Trainer:
    def __init__(self, *, model, objective, tasks, optimizer, scheduler, hardware: Hardware,
                 train_loader, val_loader, epochs: int, checkpoint_dir: Path, log: MetricsLog,
                 progress_mode: str, label: str, monitor: str, mode: str = "auto",
                 grad_clip_norm: Optional[float] = None, log_every_n_steps: int = 25,
                 stop_after_epoch: Optional[int] = None, checkpoint_extra: Optional[Dict[str, Any]] = None,
                 weighting=None, grad_norms_every_n_steps: int = 0, ranks=None, panel=None,
                 test_loader=None, test_last_epochs: int = 0):
        self.model, self.objective, self.tasks = model, objective, tasks
        self.ranks = ranks or Ranks()          # data-parallel ranks (kdmtl_cli/engine/distributed.py)
        # How the per-task losses become a step; teachers are trained with equal weights.
        if weighting is None:
            weighting = build_weighting(OmegaConf.create({"name": "equal"}), list(tasks))
        self.weighting = weighting
        self.grad_norms_every = max(0, grad_norms_every_n_steps)
        # Gradient-based weightings act on the shared trunk; heads and learned parts of
        # distillation methods get their own gradients.
        shared = list(model.shared_parameters())
        shared_ids = {id(p) for p in shared}
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self.shared = [p for p in shared if p.requires_grad]
        self.others = [p for p in params if id(p) not in shared_ids]
        self.optimizer, self.scheduler, self.hw = optimizer, scheduler, hardware
        self.train_loader, self.val_loader = train_loader, val_loader
        self.epochs, self.checkpoint_dir, self.log = epochs, Path(checkpoint_dir), log
        self.progress_mode, self.label = progress_mode, label
        check_monitor(monitor, tasks, has_val=val_loader is not None)
        self.monitor = effective_monitor(monitor, val_loader is not None)
        self.test_loader, self.test_last_epochs = test_loader, max(0, int(test_last_epochs or 0))
        self.mode = metric_direction(monitor, tasks) if mode == "auto" else mode
        if self.mode not in ("min", "max"):
            raise KdmtlError(f"checkpoint.mode must be min, max or auto (got '{mode}')")
        self.grad_clip_norm = grad_clip_norm
        self.log_every = max(1, log_every_n_steps)
        self.stop_after_epoch = stop_after_epoch
        self.checkpoint_extra = checkpoint_extra or {}
        self.state = TrainState()
        self.panel = panel                          # engine/panel.py: val images for TensorBoard
        self._position: Optional[Dict[str, Any]] = None   # where a mid-epoch checkpoint left off

    # ---- checkpoints -------------------------------------------------------------------
    def _checkpoint_state(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "objective": self.objective.modules.state_dict(),   # learned parts of KD methods
            "weighting": self.weighting.state_dict(),            # learned weights, loss histories
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.hw.scaler.state_dict() if self.hw.scaler is not None else None,
            "epoch": self.state.epoch, "global_step": self.state.global_step,
            "best_value": self.state.best_value, "best_epoch": self.state.best_epoch,
            "best_metrics": self.state.best_metrics, "monitor": self.monitor,
            "test_history": self.state.test_history,
            "rng": rng_state(), **self.checkpoint_extra,
        }

    def restore(self, checkpoint: Dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.objective.modules.load_state_dict(checkpoint.get("objective") or {})
        if checkpoint.get("weighting") is not None:
            self.weighting.load_state_dict(checkpoint["weighting"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.hw.scaler is not None and checkpoint.get("scaler"):
            self.hw.scaler.load_state_dict(checkpoint["scaler"])
        self.state = TrainState(epoch=checkpoint["epoch"], global_step=checkpoint["global_step"],
                                best_value=checkpoint["best_value"], best_epoch=checkpoint["best_epoch"],
                                best_metrics=dict(checkpoint.get("best_metrics") or {}),
                                test_history={int(e): dict(m) for e, m in
                                              (checkpoint.get("test_history") or {}).items()})
        set_rng_state(checkpoint["rng"])
        self._position = checkpoint.get("position")

    def resume_from_last(self) -> Optional[Dict[str, Any]]:
        """Continue from `<checkpoint_dir>/last.pt` when there is one (a stopped or killed run):
        restore everything, drop log records written after it, delete temporary files of a
        checkpoint write that was killed halfway. Returns the checkpoint, or None."""
        discard_partial_writes(self.checkpoint_dir)
        path = self.checkpoint_dir / "last.pt"
        if not path.exists():
            return None
        checkpoint = load_checkpoint(path)
        self.restore(checkpoint)
        position = checkpoint.get("position")
        self.log.truncate_after_epoch(checkpoint["epoch"], through_step=checkpoint["global_step"] if position else None)
        where = f" + {position['batches_done']} steps" if position else ""
        say(self.progress_mode, f"{self.label}: resuming from {path} after epoch {checkpoint['epoch']}{where}")
        return checkpoint

    def _improved(self, value: Optional[float]) -> bool:
        if self.monitor == LAST:
            return True
        best = self.state.best_value
        return best is None or (value < best if self.mode == "min" else value > best)

    def tests_this_epoch(self, epoch: int) -> bool:
        return self.test_loader is not None and epoch > self.epochs - self.test_last_epochs

    # ---- the loop ------------------------------------------------------------------------
    def fit(self) -> TrainState:
        with Progress(self.progress_mode, self.label, self.epochs) as progress:
            while self.state.epoch < self.epochs:
                epoch = self.state.epoch + 1
                train_metrics = self._train_epoch(epoch, progress)
                val_metrics = evaluate(self.model, self.val_loader, self.tasks, self.hw, "val") \
                    if self.val_loader is not None else {}
                value = None if self.monitor == LAST else {**train_metrics, **val_metrics}[self.monitor]
                self.state.epoch = epoch
                improved = self._improved(value)
                self.state.last_metrics = dict(val_metrics)
                if improved:
                    self.state.best_value, self.state.best_epoch = value, epoch
                    self.state.best_metrics = dict(val_metrics)
                    if self.monitor.startswith("train/"):
                        self.state.best_metrics[self.monitor] = value
                tested = {}
                if self.tests_this_epoch(epoch):   # averaged at the end, never used to select
                    test = evaluate(self.model, self.test_loader, self.tasks, self.hw, "test")
                    self.state.test_history[epoch] = dict(test)
                    tested = {EPOCH_TEST + k.split("/", 1)[1]: v for k, v in test.items()}
                lr = self.optimizer.param_groups[0]["lr"]
                record = {"type": "epoch", "epoch": epoch, "step": self.state.global_step, "lr": lr,
                          **train_metrics, **val_metrics, **tested, "best_epoch": self.state.best_epoch}
                self.log.write(record)
                self.log.scalars({**train_metrics, **val_metrics, **tested, "lr": lr}, self.state.global_step)
                if self.panel is not None and self.ranks.is_main:
                    for task, image in self.panel.render(self.model).items():
                        self.log.image(f"val_panel/{task}", image, self.state.global_step)
                state = self._checkpoint_state()
                self._save(state, self.checkpoint_dir / "last.pt")
                if improved:
                    self._save(state, self.checkpoint_dir / "best.pt")
                progress.end_epoch(epoch, self._epoch_line(train_metrics, val_metrics, value, improved))
                if self._stop_agreed():
                    preemption.stop(f"[{self.label}] checkpoint written after epoch {epoch} "
                                     f"({self.checkpoint_dir / 'last.pt'})")
                if self.stop_after_epoch is not None and epoch >= self.stop_after_epoch and epoch < self.epochs:
                    progress.message(f"[{self.label}] stopping after epoch {epoch} (stop_after_epoch); "
                                     "continue with resume=<run dir>")
                    break
        return self.state

    def _epoch_line(self, train: Dict[str, float], val: Dict[str, float], value, improved: bool) -> str:
        """What the epoch line says, each number named: the objective optimised (task and
        distillation terms, weighted; left out when it is the task loss, as for a teacher), the
        training task loss, the validation task loss, the selection metric when it is another, whether
        this epoch is the best kept, the epoch's time and throughput."""
        objective, task = train["train/loss/total"], train["train/loss/task"]
        parts = [] if objective == task else [f"objective {_short(objective)}"]
        parts.append(f"task loss {_short(task)}")
        if val:
            parts.append(f"val task loss {_short(val['val/loss/task'])}")
        if self.monitor == LAST:
            parts.append("(last epoch kept)")
        elif self.monitor != "val/loss/task":
            parts.append(f"{self.monitor} {_short(value)}")
        if improved and self.monitor != LAST:
            parts[-1] += " *best"
        parts.append(f"{duration(train['train/epoch_time_s'])} {train['train/samples_per_s']:,.0f} img/s")
        return "  ".join(parts)

    def _train_epoch(self, epoch: int, progress: Progress) -> Dict[str, float]:
        model, hw = self.model, self.hw
        model.train()
        self.objective.train()
        steps_per_epoch = len(self.train_loader)
        total_steps = max(1, self.epochs * steps_per_epoch)
        self.train_loader.set_epoch(epoch)
        progress.start_epoch(epoch, len(self.train_loader), epoch - 1)
        sums: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}
        window: Dict[str, torch.Tensor] = {}
        window_counts: Dict[str, int] = {}
        recent_losses = []
        samples, window_steps, first = 0, 0, 0
        position, self._position = self._position, None
        if position is not None and position["epoch"] == epoch:
            # Resuming mid-epoch: the epoch's plan is a function of (seed, epoch), so skipping the
            # batches already trained and restoring the epoch's running sums continues it exactly.
            first, samples = int(position["batches_done"]), int(position["samples"])
            sums, counts = dict(position["sums"]), dict(position["counts"])
            self.train_loader.skip_batches = first
        start = time.perf_counter()
        for step, batch in enumerate(self.train_loader, start=first):
            batch["image"] = hw.to_input(batch["image"])  # the teacher sees the same layout
            # Schedules inside methods (DKD warm-up, BAM annealing) read where training is.
            self.objective.set_progress(self.state.global_step / total_steps, epoch - 1 + step / steps_per_epoch)
            with hw.autocast():
                out = model(batch["image"])
                losses, extra, terms = self.objective.losses(out, batch)
            self.optimizer.zero_grad(set_to_none=True)
            scale = hw.scaler.scale(torch.ones((), device=hw.device)) if hw.scaler is not None else 1.0
            measure = self.grad_norms_every > 0 and self.state.global_step % self.grad_norms_every == 0
            result = weighted_backward(self.weighting, losses, extra, self.shared, self.others,
                                       scale=scale, measure_grad_norms=measure)
            loss = result.total
            terms["loss/total"] = loss
            if self.ranks.active:   # the gradient of the global batch's mean loss, on every rank
                share = batch["image"].shape[0] / self.train_loader.global_batch_size(step)
                average_gradients(self.shared + self.others, share)
            for name, value in losses.items():
                terms[f"group/{name}"] = value
                terms[f"weight/{name}"] = result.weights[name]
            if result.grad_norms is not None:
                for name, value in result.grad_norms.items():
                    terms[f"grad_norm/{name}"] = value
            clip_shared = self.weighting.shared_clip_norm   # FAMO's max_norm: the trunk's gradient only
            if hw.scaler is not None:
                if self.grad_clip_norm or clip_shared:
                    hw.scaler.unscale_(self.optimizer)
                if clip_shared:
                    torch.nn.utils.clip_grad_norm_(self.shared, clip_shared)
                if self.grad_clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip_norm)
                hw.scaler.step(self.optimizer)
                hw.scaler.update()
            else:
                if clip_shared:
                    torch.nn.utils.clip_grad_norm_(self.shared, clip_shared)
                if self.grad_clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip_norm)
                self.optimizer.step()
            step_losses = {name: value.detach() for name, value in losses.items()}
            if self.ranks.active:   # strategies adapt from the global batch's losses, alike on every rank
                step_losses = mean_across_ranks(step_losses)
            self.weighting.after_step(step_losses)
            with warnings.catch_warnings():
                # GradScaler skips optimizer steps whose gradients overflowed; the schedule
                # still advances per batch, which is what we want, so torch's warning is noise.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                self.scheduler.step()
            self.state.global_step += 1
            samples += batch["image"].shape[0]
            window_steps += 1
            for key, value in terms.items():
                value = value.detach().float()
                sums[key] = sums[key] + value if key in sums else value
                window[key] = window[key] + value if key in window else value
                counts[key] = counts.get(key, 0) + 1
                window_counts[key] = window_counts.get(key, 0) + 1
            recent_losses.append(loss.detach())
            # One host sync per window, not per step: find the first bad step afterwards.
            if window_steps == self.log_every:
                self._check_finite(recent_losses, epoch)
                means = {f"train/{k}": float(v) / window_counts[k] for k, v in window.items()}
                elapsed = time.perf_counter() - start
                lr = self.optimizer.param_groups[0]["lr"]
                self.log.scalars({**means, "train/lr": lr}, self.state.global_step)
                # Task weights and trunk gradient norms per logging window, so a stalled
                # weighting shows in metrics.jsonl as well as in TensorBoard.
                self.log.write({"type": "step", "epoch": epoch, "step": self.state.global_step, "lr": lr,
                                **{k: v for k, v in means.items()
                                   if k.startswith(("train/weight/", "train/grad_norm/", "train/group/",
                                                    "train/loss/"))}})
                window, window_counts, window_steps, recent_losses = {}, {}, 0, []
            progress.batch()
            if progress.due():   # the epoch's running mean objective, not the last window's
                progress.show(float(sums["loss/total"]) / counts["loss/total"],
                              samples / max(time.perf_counter() - start, 1e-9))
            self._after_step(epoch, step + 1, sums, counts, samples, recent_losses)
        self._check_finite(recent_losses, epoch)
        elapsed = time.perf_counter() - start
        if self.ranks.active:
            sums = mean_across_ranks(sums)
        metrics = {f"train/{k}": float(v) / counts[k] for k, v in sums.items()}
        # DWA and friends adapt once per epoch from the epoch-mean loss of each task.
        self.weighting.end_epoch({name: metrics[f"train/group/{name}"] for name in self.weighting.task_names})
        metrics.update({f"train/{k}": v for k, v in self.objective.epoch_metrics().items()})
        metrics["train/samples_per_s"] = samples / max(elapsed, 1e-9)
        metrics["train/epoch_time_s"] = elapsed
        return metrics

    def _save(self, state, path: Path) -> None:
        if self.ranks.is_main:      # one writer; every rank holds the same state
            _save_checkpoint(state, path)

    def _stop_agreed(self) -> bool:
        """Whether a stop signal arrived; with several ranks, whether it reached any of them, so
        that all stop at the same point (a rank that went on would wait for the others forever)."""
        stop = preemption.requested() is not None
        if self.ranks.active:
            stop = bool(mean_across_ranks({"stop": torch.tensor(float(stop), device=self.hw.device)})["stop"] > 0)
        return stop

    def _after_step(self, epoch: int, batches_done: int, sums, counts, samples: int, recent_losses) -> None:
        """The safe point after each step: when a stop signal arrived (engine/preemption.py),
        write `last.pt` with the position in the epoch and raise Preempted."""
        if not self._stop_agreed():
            return
        self._check_finite(recent_losses, epoch)
        state = self._checkpoint_state()
        state["position"] = {"epoch": epoch, "batches_done": batches_done, "samples": samples,
                             "sums": dict(sums), "counts": dict(counts)}
        self._save(state, self.checkpoint_dir / "last.pt")
        name = preemption.signal_name()
        raise Preempted(f"[{self.label}] {name} received: checkpoint written after epoch {epoch - 1} + "
                        f"{batches_done} steps ({self.checkpoint_dir / 'last.pt'}); run the same command "
                        "again (or resume=<run dir>) to continue")

    def _check_finite(self, recent_losses, epoch: int) -> None:
        if not recent_losses:
            return
        stacked = torch.stack(recent_losses)
        finite = torch.isfinite(stacked)
        if bool(finite.all()):
            return
        first_bad = int((~finite).nonzero()[0])
        step = self.state.global_step - len(recent_losses) + first_bad + 1
        last_good = self.checkpoint_dir / "last.pt"
        kept = f"last good checkpoint kept at {last_good}" if last_good.exists() else "no checkpoint was written yet"
        raise NonFiniteLoss(f"[{self.label}] loss became {float(stacked[first_bad])} at epoch {epoch}, "
                            f"global step {step}; stopped, {kept}; lower optim.lr, set "
                            "optim.grad_clip_norm, or use hardware.precision=32")
