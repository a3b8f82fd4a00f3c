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
