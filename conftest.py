"""Repository-wide test guard: nothing may fall back to MLflow's ./mlruns file store
(dcml tracks to sqlite only; a run started without an explicit experiment would
put its artifacts there)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def no_mlruns_file_store():
    mlruns = Path.cwd() / "mlruns"
    existed = mlruns.exists()
    yield
    if not existed and mlruns.exists():
        pytest.fail(f"{mlruns} was created during the tests: some code logged to MLflow's default experiment; "
                    "pass experiment_id to mlflow.start_run", pytrace=False)


def pytest_collection_modifyitems(config, items):
    """Modules with a test marked ``slow`` first, in their collection order, then the rest.

    Under pytest-xdist (`make test`: ``--dist loadscope --no-loadscope-reorder``)
    each module goes whole to the next free process, in this order: the long
    whole-pipeline modules start at once instead of last, so the two
    processes finish together.
    """
    def module(item):
        return getattr(getattr(item, "module", None), "__name__", "")

    slow_modules = {module(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: module(item) not in slow_modules)  # stable: the order within stays
