"""Batch rendering on Ray: any API-format workflow over a manifest of jobs (python batch/run.py --help)."""
