"""The `dcml` command. Subcommands are imported lazily so `dcml --help` is fast
and a stage's heavy imports (torch, faiss, kfp) load only when it runs."""

from __future__ import annotations

import importlib
import os
import sys

import click

from dcml.contracts.errors import DcmlError

# name -> ("module:attribute", one-line help shown by `dcml --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("components.ingest.stage:cli", "Stage 1: dataset -> Parquet manifest."),
    "extract": ("components.extract.stage:cli", "Stage 2: manifest -> backbone features (Parquet)."),
    "cluster": ("components.cluster.stage:cli", "Stage 3: features -> Faiss k-means cluster assignments."),
    "train": ("components.train.stage:cli", "Stage 4: per-cluster subspace training (shared or one worker)."),
    "finetune": ("components.finetune.stage:cli", "Stage 5: merge sub-models and fine-tune on all data."),
    "evaluate": ("components.evaluate.stage:cli", "Stage 6: Recall@K, MAP@R, R-Precision, NMI, AMI."),
    "train-dfml": ("components.dfml.stage:cli", "Stage 4 (DFML): factorised backbone with a router."),
    "compress": ("components.compress.stage:cli", "Optional: k-means weight quantisation of a model."),
    "index": ("components.index.stage:cli", "Optional: gallery embeddings -> a faiss index folder."),
    "search": ("dcml_app.retrieval:search_cli", "Top-k gallery images of query images, from an index folder."),
    "threshold": ("dcml_app.retrieval:threshold_cli", "Choose an index's match threshold again (no re-embedding)."),
    "embed": ("dcml_app.retrieval:embed_cli", "Images (folder, manifest, list) -> a Parquet file of embeddings."),
    "serve": ("dcml_app.serve:serve_cli", "Serve an index folder: search API, thumbnails, web page."),
    "export": ("dcml_app.retrieval:export_cli", "Export a model to TorchScript or ONNX (checked on real images)."),
    "params": ("dcml_app.params_cli:params_cli", "List the pipeline parameters: defaults, allowed values, meaning."),
    "run": ("dcml_app.runner:run_cli", "Run the whole pipeline locally (KFP SubprocessRunner, cached)."),
    "compile": ("dcml_app.kubeflow:compile_cli", "Compile the pipeline to Kubeflow YAML."),
    "submit": ("dcml_app.kubeflow:submit_cli", "Submit a pipeline run to a Kubeflow cluster."),
    "compare": ("dcml_app.compare:compare_cli", "Compare runs tracked in MLflow (the latest experiment by default)."),
    "study": ("dcml_app.study:study_cli", "Run a hyper-parameter study (embedding size, margin, batch size, loss)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx, formatter):
        # Help text without importing every stage.
        rows = [(name, short) for name, (_, short) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dcml")
def cli():
    """dcml: divide-and-conquer deep metric learning as a Kubeflow pipeline.

    Each stage reads and writes files (Parquet manifests, features, clusters,
    embeddings; checkpoints; metrics JSON), so any stage can be re-run alone.
    """


def main(argv=None):
    try:
        cli.main(args=argv, standalone_mode=False)
    except DcmlError as exc:
        _failed(str(exc))
    except OSError as exc:  # a full disk, a read-only or over-long path met while writing
        if os.environ.get("DCML_TRACEBACK"):
            raise
        from dcml.contracts.io import os_error_line

        _failed(os_error_line(exc))
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # a bad option value (e.g. `dcml search --k 0`): one line, not the usage block
        if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # plain `dcml`: the help
            exc.show()
            sys.exit(exc.exit_code)
        command = f"dcml {exc.ctx.info_name}" if exc.ctx is not None and exc.ctx.parent is not None else "dcml"
        _failed(f"{exc.format_message().rstrip('.')}; see `{command} --help`")
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def _failed(message: str) -> None:
    """One line, exit status 2, and no empty output folder left behind."""
    from dcml.contracts.io import remove_created_folders

    remove_created_folders()
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
