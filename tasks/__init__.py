"""Tasks: plain functions that do the work (tested without Prefect) and their thin Prefect wrappers."""
