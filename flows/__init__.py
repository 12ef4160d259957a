"""Prefect flows: orchestration only (submit, wait, collect); the work lives in tasks/."""
