"""`sdtune compare`: the four methods (and the untouched base model) side by side on one subject.

recipes (what runs) -> runner (each run in its own process: worker) -> judge (quality, pooled over seeds)
-> results (results.json) -> report (report.md, report.html, charts) with reading ("which method when").
"""

from __future__ import annotations

from .runner import CompareOptions, run_compare

__all__ = ["CompareOptions", "run_compare"]
