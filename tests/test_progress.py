import pytest
from prefect import flow
from prefect.artifacts import Artifact

from flows.progress import RunProgress

pytestmark = pytest.mark.usefixtures("prefect_api")


@flow
def report_some_progress() -> tuple:
    progress = RunProgress(networks=3, iterations=2, show_bar=False)
    at_start = Artifact.get("train-many-progress").data
    progress.advance(1, trained=2, given_up=1)  # a network failing at iteration 1 counts both its iterations
    after_first = (progress.done, progress.networks_finished)
    progress.advance(2, trained=2, given_up=0)
    after_second = (progress.done, progress.networks_finished)
    progress.close()
    return at_start, after_first, after_second


def test_progress_counts_network_iterations_and_given_up_networks_finish_early():
    at_start, after_first, after_second = report_some_progress()
    assert float(at_start) == 0.0
    assert after_first == (4, 1) and after_second == (6, 3)
    artifact = Artifact.get("train-many-progress")
    assert float(artifact.data) == pytest.approx(100.0)
    assert artifact.description.startswith("3/3 networks finished, 6/6 network-iterations")
