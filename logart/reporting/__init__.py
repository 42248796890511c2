"""`logart report DIR`: figures and a Markdown summary of a finished run folder.

    run.py       reading the folder: report.json, packed layers, per-row choices
    sizes.py     effective bits per weight, checkpoint size against fp32
    rows.py      one row's codebook levels, codes and (optionally) full-precision weights
    plots.py     the PNG figures (matplotlib, Agg canvas)
    summary.py   summary.md
    command.py   make_report() and the CLI glue (add_arguments, cmd_report)
"""

from logart.reporting.command import Report, add_arguments, cmd_report, make_report

__all__ = ["Report", "add_arguments", "cmd_report", "make_report"]
