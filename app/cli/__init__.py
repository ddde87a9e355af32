"""The `odpo` command line. Subcommands live in their own modules and are imported lazily, so
`odpo --help` and `odpo status` answer without importing torch or gradio."""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from odpo.app.config import CommonConfig
from odpo.app.user_errors import exit_status, user_error_message

# name -> "module:attribute"; a module is imported only when its command runs (or --help lists it)
COMMANDS: dict[str, str] = {
    "init": "odpo.app.cli.base:init",
    "prompts": "odpo.app.cli.base:prompts",
    "status": "odpo.app.cli.base:status",
    "users": "odpo.app.cli.users:users",
    "serve": "odpo.app.cli.serve:serve",
    "up": "odpo.app.cli.serve:up",
    "sample": "odpo.app.cli.sample:sample",
    "vllm-serve": "odpo.app.cli.sample:vllm_serve",
    "train": "odpo.app.cli.train:train",
    "judge": "odpo.app.cli.judge:judge",
    "eval": "odpo.app.cli.eval:eval_cmd",
    "export": "odpo.app.cli.export:export",
    "import": "odpo.app.cli.import_data:import_group",
    "bench": "odpo.bench.cli:bench",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return super().get_command(ctx, name)
        module_name, attr = self.lazy[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not (exc.name and f"{module_name}.".startswith(f"{exc.name}.")):
                raise  # a real missing dependency: keep the traceback
            return None  # a command whose module is not part of this build
        return getattr(module, attr)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - turned into one readable line below
            message = user_error_message(exc)
            if message is None:
                raise
            logging.getLogger("odpo").debug("error details", exc_info=True)
            error = click.ClickException(message)
            error.exit_code = exit_status(exc)  # 75: transient, `odpo up` restarts it without counting
            raise error from None


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", envvar="ODPO_DATA_DIR", default=None, metavar="DIR",
              help="Data directory: SQLite file, model cache, runs/. [env ODPO_DATA_DIR; default ./odpo-data]")
@click.option("--db", "db_url", envvar="ODPO_DB_URL", default=None, metavar="URL",
              help="Any SQLAlchemy URL, e.g. postgresql+psycopg://u:p@host/odpo [env ODPO_DB_URL; "
                   "default sqlite in the data dir]")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.version_option(package_name="odpo")
@click.pass_context
def cli(ctx: click.Context, data_dir: str | None, db_url: str | None, verbose: int) -> None:
    """odpo: a self-hosted Online DPO studio.

    Sample pairs from a LoRA policy, label them in the browser or with an LLM judge, and train the
    policy with DPO while you label.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=min(level, logging.INFO), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    # bitsandbytes warns at import about optional CPU kernels QLoRA-on-CPU would use; odpo never does.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio polls itself; not news
    logging.getLogger("alembic").setLevel(logging.WARNING)  # odpo.db.migrations logs its own one-line summary
    ctx.obj = CommonConfig.resolve(data_dir=data_dir, db_url=db_url)


def main() -> None:
    cli(prog_name="odpo")
