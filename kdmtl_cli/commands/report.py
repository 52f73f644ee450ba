"""`kdmtl report DIR [DIR ...] [group_by=[loss,weighting]] [out=FILE.md] [plot=true]`: one table over
finished runs — mean ± std over seeds per task metric (test at the checkpoint selected on
validation, validation at that epoch and at the last), Δm when the runs had a baseline, the
published number and the difference when the experiment stores one; unfinished runs listed.
Prints a rich table and writes Markdown and CSV (default: report.md / report.csv in the first
directory)."""

from __future__ import annotations

from pathlib import Path
from typing import List

from kdmtl_cli.errors import KdmtlError

OPTIONS = ("group_by", "out", "plot")


def parse(args: List[str]):
    dirs, options = [], {}
    for arg in args:
        if "=" in arg and not Path(arg).exists():
            key, value = arg.split("=", 1)
            if key not in OPTIONS:
                raise KdmtlError(f"unknown report option '{key}'; choose from: {', '.join(OPTIONS)} "
                                 "(e.g. kdmtl report multirun/DATE/TIME group_by=[loss,weighting] out=results.md)")
            options[key] = value
        else:
            dirs.append(Path(arg))
    if not dirs:
        raise KdmtlError("kdmtl report needs a run or multirun directory: kdmtl report multirun/DATE/TIME")
    group_by = [k.strip() for k in options.get("group_by", "").strip("[]").split(",") if k.strip()] or None
    out = Path(options["out"]) if "out" in options else dirs[0] / "report.md"
    plot = options.get("plot", "false").lower()
    if plot not in ("true", "false"):
        raise KdmtlError(f"plot must be true or false (got '{options['plot']}')")
    return dirs, group_by, out, plot == "true"


def report_main(args: List[str]) -> int:
    from kdmtl_cli.engine.checkpoint import atomic_write_text
    from kdmtl_cli.report import table
    from kdmtl_cli.report.runs import find_runs, group_runs

    dirs, group_by, out, plot = parse(args)
    runs, unfinished = find_runs(dirs)
    groups = group_runs(runs, group_by) if runs else []
    rows = table.rows(groups)
    title = f"kdmtl report: {len(runs)} finished run(s) in {len(groups)} group(s)"
    table.print_rich(rows, unfinished, title)
    atomic_write_text(f"# {title}\n\n" + table.markdown(rows, unfinished), out)
    atomic_write_text(table.to_csv(rows), out.with_suffix(".csv"))
    print(f"written: {out}, {out.with_suffix('.csv')}")
    if plot and groups:
        from kdmtl_cli.report.plots import write_plots

        paths = write_plots(groups, out.parent)
        print("plots: " + ", ".join(str(p) for p in paths))
    return 0
