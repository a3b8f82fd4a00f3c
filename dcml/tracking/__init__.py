"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The run tree is built from the stage records that travel inside the final
artifacts (dcml.contracts.records), after the pipeline has run. Modules:

* ``store``: the tracking URI (sqlite under ./mlflow, never ./mlruns), safe
  creation of the store and of experiments (marked model-training), UI links;
* ``runs``: the run tree (parent run: the pipeline's parameters, the headline as its description);
* ``naming``: the parent run's parameters and the run names;
* ``models``: the delivered model as an MLflow logged model of flavor ``dcml`` (the checkpoint itself,
  no pickle), registered under the experiment's name with the alias ``candidate``, and its safe loader;
* ``liveness``: recognising and closing runs whose track step died;
* ``plots``: training curves, Recall@K, cluster sizes, routing, embedding map;
* ``compare``: pipeline runs side by side (``dcml compare`` is dcml_app.compare).
"""

from dcml.tracking.store import (DEFAULT_EXPERIMENT, EXPERIMENT_KIND_TAG, TRAINING_KIND, connect,
                                 default_store_dir, default_tracking_uri, setup, store_lock, ui_base, ui_command, ui_url)
from dcml.tracking.liveness import reap_dead_runs
from dcml.tracking.plots import embedding_map, make_plots, plot_metric, routing_plot, training_curves_figure
from dcml.tracking.models import ALIAS, download_model, load_logged_model, log_model, registered_name
from dcml.tracking.runs import PARENT_RUN_ENV, log_pipeline_run, metric_key, run_name_for, run_parameters
from dcml.tracking.compare import KEY_PARAMS, compare_runs, latest_experiment

__all__ = [
    "DEFAULT_EXPERIMENT", "EXPERIMENT_KIND_TAG", "TRAINING_KIND", "connect", "default_store_dir",
    "default_tracking_uri", "setup", "store_lock", "ui_base", "ui_command", "ui_url", "reap_dead_runs", "embedding_map",
    "make_plots", "plot_metric", "routing_plot", "training_curves_figure", "load_logged_model", "log_model",
    "log_pipeline_run", "metric_key", "run_name_for", "run_parameters", "KEY_PARAMS", "compare_runs",
    "latest_experiment", "PARENT_RUN_ENV", "ALIAS", "download_model", "registered_name",
]
