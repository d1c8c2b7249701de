"""Run reports: score tables, training plots and ``report.md``."""
