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

HELP = """usage: kdmtl report DIR [DIR ...] [group_by=[KEY,...]] [reference=GROUP] [out=FILE.md] [plot=true|false]

One table over finished kdmtl train runs: mean ± std over seeds of each task metric (test at
the checkpoint chosen on validation, validation at that epoch and at the last), Δm when the
runs had a baseline, the published number when the experiment stores one; unfinished runs are
listed. Prints the table and writes it as Markdown and CSV. Each group is compared with the
reference group (paired t-test on the same seeds, else Welch's; p adjusted by Holm): the
terminal marks each value ▲ better, ▼ worse or = no evidence and shows under it the bootstrap
95% CI over seeds, the Holm p and the seeds needed for 80% power; the files add the t interval,
both p-values and the difference. A published number is checked against the runs: inside or
outside their 95% CI, the difference in seed standard deviations, and whether the runs tested
the same epoch as the paper (last / best / mean of the last N).

arguments:
  DIR                 a run directory, a multirun directory, or any folder holding runs
                      (searched recursively); several may be given
  group_by=[KEY,...]  config keys that make a group (default: the settings that differ between
                      runs, seeds aside); loss means the distillation methods
  reference=GROUP     the group the others are compared with: its label in report.csv, its
                      column header in the terminal, or KEY:VALUE for the one group with that
                      setting (reference=loss:none, reference=loss:fitnet+kd,
                      reference=weighting:pcgrad); default the first group
  out=FILE.md         where the Markdown goes, with FILE.csv beside it
                      (default: DIR/report.md and DIR/report.csv of the first DIR)
  plot=true|false     also PNG plots beside out (trade-off and learning curves; needs
                      matplotlib: pip install kdmtl[plot]); default false
  -h, --help          this text

examples:
  kdmtl report multirun/DATE/TIME
  kdmtl report multirun/DATE/TIME group_by=[loss,weighting] out=results.md
  kdmtl report multirun/DATE/TIME reference=loss:none
  kdmtl report outputs/DATE/TIME-A outputs/DATE/TIME-B plot=true"""

OPTIONS = ("group_by", "reference", "out", "plot")


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
    return dirs, group_by, out, plot == "true", options.get("reference")


def report_main(args: List[str]) -> int:
    from rich.console import Console

    from kdmtl_cli.report import table
    from kdmtl_cli.report.runs import find_runs, group_runs, provenance_notes
    from kdmtl_cli.report.pareto import best_lines, find_search
    from kdmtl_cli.report.stats import check_reference
    from kdmtl_cli.report.sweep import job_settings

    dirs, group_by, out, plot, reference = parse(args)
    runs, unfinished = find_runs(dirs)
    groups = group_runs(runs, group_by) if runs else []
    reference = check_reference(reference, groups)      # a label, or KEY:VALUE resolved to one
    heading = table.title(len(runs), len(groups))
    console = Console(highlight=False)     # its width: the terminal's (or COLUMNS)
    table.print_rich(groups, unfinished, heading, console, reference)    # the files below keep every column
    markdown_path, csv_path = table.write_report(groups, unfinished, heading, out, reference)
    for line in provenance_notes(groups):
        console.print(line, markup=False)
    found = find_search(runs) if runs else None      # the runs were trials of a search (kdmtl_cli/search.py)
    if found:
        for line in best_lines(found, lambda trial: job_settings(trial.run)):
            console.print(line, markup=False, soft_wrap=True)
    console.print(f"written: {markdown_path}, {csv_path}", markup=False)
    if plot and groups:
        from kdmtl_cli.report.plots import write_plots

        paths = write_plots(groups, out.parent)
        console.print("plots: " + ", ".join(str(p) for p in paths), markup=False)
    return 0
