"""Evaluation of optimized prompts: per-item outcomes, statistics and reports."""
