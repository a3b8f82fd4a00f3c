"""Training from Python: the pipeline as `dcml run` runs it, returning the delivered model and its metrics.

>>> import dcml_app
>>> trained = dcml_app.train("demo", epochs=2)        # a preset, a JSON file or a dict; then any parameter
>>> trained.metrics["recall@1"], trained.model_path
>>> trained.model.embed("photos/")                    # the delivered model, a dcml.Model

It is the application's (dcml_app), beside `dcml run`, because running the
pipeline (kfp.local, its cache, MLflow) is: the library ``dcml`` never imports
the application. Bad parameters raise :class:`dcml.DcmlError` (one line) before
any stage runs; a failed stage raises it with the stage's log path.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from dcml.contracts import records
from dcml.contracts.errors import DcmlError


@dataclass
class Trained:
    """What :func:`train` delivered: the model file the run evaluated last, its test metrics, the run."""

    model_path: Path
    metrics: dict
    run_dir: Path
    summary: dict = field(repr=False)  # run_local's: stages, logs, MLflow run, training effect, index

    @functools.cached_property
    def model(self):
        """The delivered model as a :class:`dcml.Model` (loaded on first use)."""
        import dcml

        return dcml.load_model(self.model_path)

    @property
    def mlflow(self) -> dict:
        """The run's MLflow record (run id, tracking URI, UI address); {} when nothing was tracked."""
        return self.summary.get("mlflow", {})


def train(config: str | os.PathLike | dict | None = None, *, mode: str = "shared", method: str = "dc",
          rounds: int = 1, output_dir: str | os.PathLike = "runs", cache: bool = True,
          tracking_uri: str | None = None, verbose: bool = False, **parameters) -> Trained:
    """Run the whole pipeline on this machine, as ``dcml run --config CONFIG --set NAME=VALUE ...`` does.

    ``config``: a preset name (``dcml run --config``), a JSON file, or a dict of pipeline parameters;
    ``parameters``: more of them (``epochs=3``), checked like ``--set`` (``dcml params`` lists them).
    ``mode`` / ``method`` / ``rounds``: the pipeline's structure. One line per stage is printed.
    """
    from dcml_app.runner import resolve_arguments, run_local

    if config is not None and not isinstance(config, (str, os.PathLike, dict)):
        raise DcmlError(f"config={config!r}: pass a preset name, a JSON file or a dict of pipeline parameters")
    from dcml.contracts import params

    # Python values checked as they are, then handed on as --set text (which reads back the same values)
    values = params.validate({**(config if isinstance(config, dict) else {}), **parameters}, "dcml_app.train",
                             between=False)  # the rules between parameters: on the merge, in resolve_arguments
    sets = tuple(f"{name}={value}" for name, value in values.items())
    args = resolve_arguments(None if isinstance(config, dict) or config is None else str(config), sets)
    summary = run_local(args, mode=mode, method=method, rounds=rounds, output_dir=output_dir, cache=cache,
                        tracking_uri=tracking_uri, verbose=verbose)
    run_dir = Path(summary["run_dir"])
    return Trained(delivered_model(run_dir, Path(summary["metrics_file"])), summary["metrics"], run_dir, summary)


def delivered_model(run_dir: Path, metrics_file: Path) -> Path:
    """The model file of ``run_dir`` that the final evaluation scored (by the lineage's execution id)."""
    wanted = records.read(metrics_file).get("inputs", {}).get("model", {}).get("exec_id")
    for path in sorted(run_dir.glob("*/model/model.pt")):
        if wanted and records.read(path).get("exec_id") == wanted:
            return path
    raise DcmlError(f"{run_dir}: no model file of the evaluated model ({wanted}); see {metrics_file}")
