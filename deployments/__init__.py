"""Deployments: train_many served to the Prefect UI, with a nightly retraining schedule.

`python -m deployments.serve` serves them against the Prefect API in PREFECT_API_URL;
`python -m deployments.local` (`make serve`) first starts a local Prefect server (SQLite) for them.
`prefect.yaml` at the top level declares the same deployment for `prefect deploy` and a process work pool.
"""
