"""PNG plots beside the report table (`kdmtl report DIR plot=true`, matplotlib: `pip install
kdmtl[plot]`):

- `tradeoff_<metric>.png`: each group's test metric (mean ± std over seeds) against the
  student's parameters and against its latency per image, with the teacher as its own point;
- `curves.png`: per group, the total training loss and validation metrics by epoch, and
  `curves_loss_terms.png`: each named loss term (task/<t>, kd/<t>, ...) by epoch (means over
  seeds, from each run's metrics.jsonl).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.report.runs import Group, mean_std
from kdmtl_cli.runfiles import read_jsonl

METRICS_FIX = "delete or repair it (that run then has no curves), or report without plot=true"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")   # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise KdmtlError("plot=true needs matplotlib: pip install kdmtl[plot]") from None
    return plt


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(" ", "")


def tradeoff(groups: List[Group], metric: str, out_dir: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, cost, unit in ((axes[0], "params", "parameters (M)"), (axes[1], "latency_ms", "latency / image (ms)")):
        teacher_done = False
        for group in groups:
            xs = [r.results.get(f"student/{cost}") for r in group.runs]
            ys = [r.results.get(metric) for r in group.runs]
            if None in xs or None in ys:
                continue
            x = mean_std([v / 1e6 if cost == "params" else v for v in xs])[0]
            y, err, _ = mean_std(ys)
            ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=3, label=group.label[:40])
            tx = [r.results.get(f"teacher/{cost}") for r in group.runs]
            ty = [r.results.get(f"teacher/{metric}") for r in group.runs]
            if not teacher_done and None not in tx and None not in ty:
                t_x = mean_std([v / 1e6 if cost == "params" else v for v in tx])[0]
                t_y, t_err, _ = mean_std(ty)
                ax.errorbar([t_x], [t_y], yerr=[t_err], fmt="s", color="black", capsize=3, label="teacher")
                teacher_done = True
        ax.set_xlabel(unit)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{metric}: mean ± std over seeds")
    fig.tight_layout()
    path = out_dir / f"tradeoff_{_safe(metric)}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def curves(groups: List[Group], names: List[str], out_dir: Path, filename: str = "curves.png") -> Path:
    """Epoch curves (mean over a group's seeds) of `names`, one panel per name."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        for group in groups:
            per_epoch: Dict[int, List[float]] = {}
            for run in group.runs:
                log = run.path / "metrics.jsonl"
                if not log.is_file():
                    continue
                for record in read_jsonl(log, METRICS_FIX):
                    if record.get("type") == "epoch" and name in record:
                        per_epoch.setdefault(record["epoch"], []).append(record[name])
            if per_epoch:
                epochs = sorted(per_epoch)
                ax.plot(epochs, [mean_std(per_epoch[e])[0] for e in epochs], marker="o", label=group.label[:40])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out_dir / filename
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(groups: List[Group], out_dir: Path) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = sorted({k for g in groups for r in g.runs for k in r.results
                      if k.startswith("test/") and k.count("/") == 2 and k.split("/")[1] not in ("task", "loss")})
    paths = [tradeoff(groups, m, out_dir) for m in metrics]
    names = ["train/loss/total"] + sorted({k for g in groups for r in g.runs for k in r.best
                                           if k.startswith("val/") and k.count("/") == 2
                                           and k.split("/")[1] not in ("task", "loss")})[:3]
    paths.append(curves(groups, names, out_dir))
    # every named loss term (task/<t>, kd/<t>, at/..., weighted groups excluded), one panel each
    terms = sorted({k for g in groups for r in g.runs for k in _epoch_keys(r.path)
                    if k.startswith("train/") and k.count("/") >= 2
                    and k.split("/")[1] not in ("loss", "group", "weight", "grad_norm", "samples_per_s")})
    if terms:
        paths.append(curves(groups, terms[:8], out_dir, "curves_loss_terms.png"))
    return paths


def _epoch_keys(run_dir: Path) -> List[str]:
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return []
    for record in read_jsonl(log, METRICS_FIX):
        if record.get("type") == "epoch":
            return list(record)
    return []
