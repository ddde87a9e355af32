"""`odpo sample`: one sampler worker (app/sample.py). Run as many as the hardware allows, on any
host that reaches the database and the adapter directories; `odpo up` starts one."""
from __future__ import annotations

from typing import Any

import click

from odpo.app.cli.serve import SAMPLER_OPTIONS, SHARED_OPTIONS, apply_options, sample_config
from odpo.app.config import CommonConfig


@click.command()
@apply_options(SHARED_OPTIONS)
@apply_options(SAMPLER_OPTIONS)
@click.option("--name", default=None, help="This worker's name on the dashboard (default: host-pid).")
@click.pass_obj
def sample(cfg: CommonConfig, **options: Any) -> None:
    """A sampler worker: keeps the queue of pairs full from the newest committed version."""
    from odpo.app.lifecycle import exit_now
    from odpo.app.sample import run_sample

    run_sample(cfg, sample_config(options))
    exit_now(0)  # skip the interpreter's seconds-long teardown (see exit_now)
