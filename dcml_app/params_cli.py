"""`dcml params`: the pipeline parameters, their defaults, ranges and meaning (from dcml.contracts.params)."""

from __future__ import annotations

import click

from dcml.contracts import params


def resolved(config: str | None, sets: tuple[str, ...]) -> dict:
    """Every pipeline parameter as `dcml run --config CONFIG --set ...` resolves it: its default, then the
    preset (or JSON file), then --set (what the run's MLflow parent run records)."""
    from dcml_app.runner import resolve_arguments

    return {**params.defaults([p.name for p in params.pipeline_params()]), **resolve_arguments(config, sets)}


@click.command("params")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json"]), default="table", show_default=True)
@click.option("--config", default=None, help="Show the values a run of this preset or JSON file would use.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="With or without --config: as `dcml run` "
              "takes it (repeatable).")
@click.argument("names", nargs=-1)
def params_cli(fmt, config, sets, names):
    """List the pipeline parameters (`dcml run --set NAME=VALUE`), or only NAMES; with --config/--set, the values
    a run would use."""
    import json

    from dcml.contracts.errors import DcmlError

    unknown = sorted(set(names) - set(params.PARAMS))
    if unknown:
        raise DcmlError(f"unknown parameter(s) {', '.join(unknown)}; `dcml params` lists them all")
    if config or sets or fmt == "json":
        values = resolved(config, tuple(sets))
        values = {k: v for k, v in values.items() if not names or k in names}
        if fmt == "json":
            click.echo(json.dumps(values, indent=1, sort_keys=True))
        else:
            width = max(len(k) for k in values)
            for name, value in values.items():
                click.echo(f"{name.ljust(width)}  {value!r}")
        return
    rows = [p for p in params.pipeline_params() if not names or p.name in names]
    rules = [c.rule for c in params.CONSTRAINTS if not names or set(c.names) & set(names)]
    if fmt == "markdown":
        click.echo("| parameter | default | allowed | meaning |\n|---|---|---|---|")
        for p in rows:
            click.echo(f"| `{p.name}` | `{p.default!r}` | {p.describe_range()} | {p.help} |")
        click.echo("".join(f"\nBetween parameters (refused before anything runs): {rule}." for rule in rules))
        return
    width = max(len(p.name) for p in rows)
    dwidth = max(len(repr(p.default)) for p in rows)
    group = None
    for p in rows:
        if p.group != group:
            group = p.group
            click.echo(f"[{group}]")
        allowed = "" if p.type in (str, bool) and not p.choices else f" ({p.describe_range()})"
        click.echo(f"  {p.name.ljust(width)}  {repr(p.default).ljust(dwidth)}  {p.help}{allowed}")
    if rules:
        click.echo("[between parameters: refused before anything runs]")
        for rule in rules:
            click.echo(f"  {rule}")
