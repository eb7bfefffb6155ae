"""Sections of ``bench/run.py``: each measures one question side by side with its peers and
returns a :class:`~suite.report.Section` (markdown, figures, and the places where we lose)."""
