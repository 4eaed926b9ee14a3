"""Evaluation: lm-eval-identical medical MCQA scoring and KV-cache generation.

``python -m medjax.eval`` runs the benchmarks; see docs/EVAL.md.
"""
from medjax.eval.tasks import GROUPS, TASKS, Task, resolve

__all__ = ["GROUPS", "TASKS", "Task", "resolve"]
