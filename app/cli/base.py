"""Base commands: `odpo init`, `odpo prompts import|list`, `odpo status` (thin: app.services does the work)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from odpo.app.config import CommonConfig
from odpo.app.services.prompts import ensure_initialised, import_prompt_files, list_prompts
from odpo.app.services.status import read_status
from odpo.trainer.options import MAX_PROMPT_CHARS


@click.command()
@click.option("--no-starter", is_flag=True, help="Do not import the bundled starter prompts.")
@click.pass_obj
def init(cfg: CommonConfig, no_starter: bool) -> None:
    """Create the data directory and database, and import the starter prompts (first time only)."""
    added = ensure_initialised(cfg, starter=not no_starter)
    click.echo(f"data directory: {cfg.data_dir}")
    click.echo(f"database: {cfg.shown_db_url}")
    click.echo(f"starter prompts imported: {added}" if added else "starter prompts: already present or skipped")


@click.group()
def prompts() -> None:
    """Import and list prompts."""


@prompts.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--held-out", "held_out", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0,
              show_default=True, help="Fraction marked as held-out eval prompts (deterministic by text).")
@click.option("--max-chars", type=click.IntRange(1), default=MAX_PROMPT_CHARS, show_default=True,
              help="Reject prompts longer than this.")
@click.pass_obj
def prompts_import(cfg: CommonConfig, files: tuple[Path, ...], held_out: float, max_chars: int) -> None:
    """Import prompts from JSONL/JSON (`prompt` or chat `messages`), CSV/TSV (`prompt` column),
    Parquet, or plain text (one per line), in UTF-8. All files are one transaction: nothing is
    written unless every file is valid; a bad file (or one over the size or row limit) is one line
    naming it, the line and the limit."""
    from odpo.app.services.prompt_files import PromptFileError

    try:
        result = import_prompt_files(cfg, files, held_out_fraction=held_out, max_chars=max_chars)
    except PromptFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"imported {result.added} prompts ({result.held_out} held out), "
               f"skipped {result.duplicates} duplicates")


@prompts.command("list")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@click.option("--held-out/--train", "held_out", default=None, help="Only held-out or only training prompts.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def prompts_list(cfg: CommonConfig, limit: int, offset: int, held_out: bool | None, as_json: bool) -> None:
    """List stored prompts."""
    rows = list_prompts(cfg, limit=limit, offset=offset, held_out=held_out)
    for p in rows:
        if as_json:
            click.echo(json.dumps({"id": p.id, "prompt": p.text, "source": p.source, "tags": p.tags,
                                   "held_out": p.held_out}))
        else:
            flag = "H" if p.held_out else " "
            click.echo(f"{p.id:>6} {flag} {p.text[:100].replace(chr(10), ' ')}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--run", default="default", show_default=True, help="Training run name.")
@click.pass_obj
def status(cfg: CommonConfig, as_json: bool, run: str) -> None:
    """Prompts, pairs by status, labels by source, adapter versions and the last training step."""
    counts = read_status(cfg, run=run)
    if as_json:
        click.echo(json.dumps(counts, indent=2))
        return
    click.echo(f"database: {cfg.shown_db_url}")
    free = counts.get("disk_free_bytes")
    if free is not None:
        click.echo(f"disk: {free / 2**20:,.0f} MB free in {cfg.data_dir}")
    if counts.get("runs_disk_free_bytes") is not None:
        click.echo(f"disk: {counts['runs_disk_free_bytes'] / 2**20:,.0f} MB free in {cfg.data_dir / 'runs'} "
                   "(adapter versions)")
    trainer = counts["trainer"]
    detail = trainer["detail"].removeprefix("training paused: ")
    click.echo(f"trainer: {trainer['state']}{': ' + detail if detail else ''}")
    click.echo(f"prompts: {counts['prompts']} ({counts['held_out']} held out)")
    click.echo("pairs: " + ", ".join(f"{k} {v}" for k, v in counts["pairs"].items()))
    labels = ", ".join(f"{k} {v}" for k, v in counts["labels"].items()) or "none"
    click.echo(f"labels: {labels}; waiting for training: {counts['unconsumed_trainable']}")
    versions = counts["adapter_versions"]
    click.echo(f"adapter versions: {', '.join(f'v{v}' for v in versions) if versions else 'none (base model)'}")
    last = counts["last_step"]
    if last:
        click.echo(f"last step: {last['step']} -> v{last['version']} loss {last['loss']:.4f} "
                   f"reward acc {last['reward_accuracy']:.2f} at {last['at']}")


@prompts.command("promote")
@click.argument("ids", nargs=-1, type=int)
@click.option("--list", "show", is_flag=True, help="List the typed prompts waiting for promotion instead.")
@click.pass_obj
def prompts_promote(cfg: CommonConfig, ids: tuple[int, ...], show: bool) -> None:
    """Let typed prompts (a labeler's "ask your own prompt") join the shared pool: sampled for
    everyone, judged, and trained on. Until then they are their typist's alone."""
    from odpo.app.services.typed_prompts import promote, waiting

    db = cfg.open_db()
    try:
        if show or not ids:
            rows = waiting(db)
            for row in rows:
                click.echo(f"{row['id']:>6} {row['text'][:100]!r}")
            click.echo(f"{len(rows)} typed prompt(s) waiting" + ("" if show else "; give their ids to promote them"))
            return
        moved = promote(db, ids=ids)
    finally:
        db.close()
    rest = "" if moved == len(ids) else " (the others were not typed prompts, or already promoted)"
    click.echo(f"promoted {moved} of {len(ids)} prompt(s){rest}")
