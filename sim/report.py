"""Re-export: reports live in ``scheduler.telemetry.report`` (the live replayer writes them too)."""

from scheduler.telemetry.report import print_summaries, summary_table, write_figure, write_json

__all__ = ["print_summaries", "summary_table", "write_figure", "write_json"]
