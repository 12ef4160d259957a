"""Deployments: how train_many is served to the Prefect UI and run on schedules (issue #6).

Nothing is deployed yet; train_many is called from Python (`from flows.train import train_many`)
or from the shell (`make run`, i.e. `python -m flows.cli`).
"""
