"""Evaluation: metrics (arrays in, dicts out), plots, reports."""
