"""`odpo import dataset FILE`: store a preference dataset for `odpo train --mode offline`.

Thin: app/services/dataset_import.py reads and stores. A file with bad rows prints one line per bad
row (the first MAX_LISTED) and imports nothing, unless --skip-bad imports the good ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from odpo.app.config import CommonConfig


@click.group("import")
def import_group() -> None:
    """Import data made elsewhere (a preference dataset to train offline)."""


@import_group.command("dataset")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Dataset name: labels get source dataset:NAME. [default: the file's stem]")
@click.option("--skip-bad", is_flag=True, help="Import the good rows of a file with bad rows (listed) instead of "
                                               "refusing the whole file.")
@click.pass_obj
def import_dataset_cmd(cfg: CommonConfig, file: Path, name: Optional[str], skip_bad: bool) -> None:
    """A preference dataset in TRL's formats (prompt/chosen/rejected strings, conversational messages,
    or implicit-prompt conversations) from .jsonl or .parquet; what `odpo export dataset` writes
    imports as is. Train on it with `odpo train --mode offline`; the online trainer leaves it alone."""
    from odpo.app.services.dataset_import import MAX_LISTED, DatasetFileError, import_dataset

    db = cfg.open_db()
    try:
        report = import_dataset(db, path=file, name=name, skip_bad=skip_bad)
    except DatasetFileError as exc:
        _list_bad(exc.problems, MAX_LISTED)
        raise click.ClickException(str(exc)) from None
    finally:
        db.close()
    if report.bad_rows:
        _list_bad(report.bad_rows, MAX_LISTED)
        click.echo(f"skipped {len(report.bad_rows)} bad row(s) (--skip-bad)", err=True)
    click.echo(f"imported {report.pairs} preference pairs from {report.file} as dataset {report.name!r} "
               f"({report.prompts_added} new prompts, {report.prompts_reused} already stored); "
               f"train on them with `odpo train --mode offline`")


def _list_bad(problems: list[str], limit: int) -> None:
    """One line per bad row on stderr, the first `limit` of them."""
    for line in problems[:limit]:
        click.echo(line, err=True)
    if len(problems) > limit:
        click.echo(f"... and {len(problems) - limit} more bad row(s)", err=True)
