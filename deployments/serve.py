"""Serve train_many as a deployment: runnable from the UI's Run button, nightly schedule off by default."""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.train import train_many

DEPLOYMENT_NAME = "train-many"
NIGHTLY = "0 2 * * *"


def train_many_deployment(nightly: bool = False) -> RunnerDeployment:
    """The train_many deployment; its 02:00 UTC nightly retraining schedule is inactive unless `nightly`.

    Turn the schedule on later from the UI (Deployments → train-many → Schedules) or with
    `prefect deployment schedule resume`.
    """
    return train_many.to_deployment(
        name=DEPLOYMENT_NAME,
        description="Train one network per series of a long table; re-running with the same output_dir resumes.",
        tags=["manynets", "training"],
        parameters={"progress_bar": False},  # no terminal behind a served run
        schedules=[Cron(NIGHTLY, timezone="UTC", active=nightly)],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nightly", action="store_true", help="activate the nightly retraining schedule")
    args = parser.parse_args(argv)
    serve(train_many_deployment(nightly=args.nightly))


if __name__ == "__main__":
    main()
