"""`odpo serve` (the web app; an inline sampler on request) and `odpo up` (serve + sampler workers +
train [+ judge], one command).

Their options come from the config dataclasses (ServeConfig, SampleConfig, TrainConfig) through
odpo.app.cli.flags, and `up` hands each child its options with `config_argv`, so an option is
declared once. Heavy imports (torch, transformers, gradio) happen inside the commands, so
`odpo --help` is fast.
"""
from __future__ import annotations

import logging
import shlex
from typing import Any

import click

from odpo.app.cli.flags import apply_options, click_options, config_argv, config_from, given, specs
from odpo.app.config import MODEL_FIELDS, CommonConfig, SampleConfig, ServeConfig
from odpo.db.settings import DB_URL_ENV
from odpo.trainer.options import BACKGROUND_NICE, VLLM_PORT
from odpo.trainer.training.train_config import TrainConfig

log = logging.getLogger(__name__)

SERVE_OPTIONS = click_options(ServeConfig, skip=("name",))  # a worker's name is `odpo sample`'s alone


def serve_config(options: dict[str, Any]) -> ServeConfig:
    """Click values -> ServeConfig; its checks become one-line usage errors."""
    return config_from(ServeConfig, options, skip=("name",))


def sampler_only_options() -> list[str]:
    """Options only a sampler reads (a serve without --inline-sampler ignores them)."""
    return [s.name for s in specs(SampleConfig) if s.name not in (*MODEL_FIELDS, "name")]


def web_options() -> set[str]:
    """What a serve without a model needs: its own fields, and the run it shows."""
    return {s.name for s in specs(ServeConfig)} - {s.name for s in specs(SampleConfig)} | {"run"}


@click.command()
@apply_options(SERVE_OPTIONS)
@click.pass_obj
def serve(cfg: CommonConfig, **options: Any) -> None:
    """The labeling web app. Pairs come from `odpo sample` workers (or --inline-sampler)."""
    from odpo.app.lifecycle import exit_now
    from odpo.app.web import run_serve

    config = serve_config(options)
    if not config.inline_sampler:
        ignored = given(click.get_current_context(), sampler_only_options())
        if ignored:
            log.warning("serve holds no model: %s apply to `odpo sample` workers (or add --inline-sampler)",
                        ", ".join("--" + n.replace("_", "-") for n in ignored))
    run_serve(cfg, config)
    exit_now(0)  # skip the interpreter's seconds-long teardown (see exit_now)


@click.command()
@apply_options(SERVE_OPTIONS)
@click.option("--workers", type=click.IntRange(0), default=1, show_default=True,
              help="`odpo sample` workers to start (0 with --inline-sampler, or with workers run elsewhere).")
@click.option("--judge", "judge_spec", default=None, metavar="SPEC",
              help="Also run `odpo judge --judge SPEC` (shadow labels for agreement stats; see --auto-label).")
@click.option("--auto-label", is_flag=True, help="Let the judge label queued pairs (needs --judge).")
@click.option("--no-train", is_flag=True, help="Do not start the trainer.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Passed to train: pairs per step.")
@click.option("--report-to", default=None, metavar="LIST",
              help="Passed to train: where training metrics also go (tensorboard, wandb, trackio, all or none).")
@click.option("--save-every", type=click.IntRange(1), default=None, help="Passed to train.")
@click.option("--max-steps", type=click.IntRange(1), default=None,
              help="Passed to train; `up` exits 0 when train finishes.")
@click.option("--until-version", type=click.IntRange(1), default=None,
              help="Passed to train; `up` exits 0 when that version is committed.")
@click.option("--train-args", default="", metavar="ARGS", help="Extra `odpo train` options, e.g. '--beta 0.2'.")
@click.option("--judge-args", default="", metavar="ARGS", help="Extra `odpo judge` options.")
@click.option("--grace", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds a child gets to stop before it is killed. A trainer stopped mid-step finishes the "
                   "step's first pass, skips its later passes and commits what it has (measured 16 s for one "
                   "pass at batch 8 of the default model on 2 loaded CPU cores); killing it earlier is safe but "
                   "replays those steps.")
@click.option("--max-restarts", type=click.IntRange(0), default=5, show_default=True,
              help="Restart a crashed child up to this many times in a row (a child that ran 60 s starts "
                   "a fresh count); then give up on it. 0: a crash stops everything.")
@click.option("--restart-delay", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Seconds before the first restart; doubled per crash in a row, at most 30.")
@click.option("--background-nice", type=click.IntRange(0, 19), default=BACKGROUND_NICE, show_default=True,
              help="Nice increment of the trainer and judge processes (background work yields to the web app).")
@click.option("--vllm-bin", default=None, metavar="PATH",
              help="With --sampler vllm and no --vllm-url: the vllm executable to start "
                   "[default: as `odpo vllm-serve` finds it].")
@click.pass_context
def up(ctx: click.Context, **options: Any) -> None:
    """Start everything on this machine: serve, sampler workers, train (and a judge), with one log."""
    from odpo.app.services.prompts import ensure_initialised
    from odpo.app.up import RestartPolicy, Supervisor, database_report

    cfg: CommonConfig = ctx.obj
    if options["auto_label"] and not options["judge_spec"]:
        raise click.UsageError("--auto-label needs --judge SPEC")
    vllm_started = options["backend"] == "vllm" and not options["vllm_urls"]  # up starts `vllm serve`
    serve_config({**options, "vllm_urls": f"http://127.0.0.1:{VLLM_PORT}"} if vllm_started else options)
    if not options["headless"]:
        from odpo.app.services.exposure import sign_in_for
        from odpo.app.web import check_listen_address, ui_available

        if ui_available():
            sign_in_for(host=options["host"], port=options["port"], auth_file=options["auth_file"],
                        data_dir=cfg.data_dir, insecure_no_auth=options["insecure_no_auth"])
            check_listen_address(options["host"], options["port"])
    children = up_children(options)  # checks --train-args before anything starts
    added = ensure_initialised(cfg)
    if added:
        click.echo(f"[up] first start: imported {added} starter prompts into {cfg.shown_db_url}")
    restart = RestartPolicy(max_restarts=options["max_restarts"], first_delay_s=options["restart_delay"])
    db = cfg.open_db()
    try:
        code = Supervisor(children, global_args=global_args(ctx), grace_s=options["grace"], restart=restart,
                          report=database_report(db, run=options["run"]), env={DB_URL_ENV: cfg.db_url}).run()
    finally:
        db.close()
    ctx.exit(code)


def global_args(ctx: click.Context) -> list[str]:
    """The root options the children need to see the same data and log at the same level. The
    database URL goes through the environment instead (Supervisor's env): argv is public (`ps`)."""
    cfg: CommonConfig = ctx.obj
    args = ["--data-dir", str(cfg.data_dir)]
    verbose = (ctx.parent.params.get("verbose") if ctx.parent else 0) or 0
    return args + ["-v"] * verbose


def up_children(options: dict[str, Any]) -> list[Any]:
    """The child commands `odpo up` runs, from its options: serve (the web app), the sampler
    workers (unless serve samples inline), the trainer and a judge. Each child's arguments are
    its config's non-default options (config_argv): nothing is listed by hand."""
    from odpo.app.up import ChildSpec

    inline = options.get("inline_sampler") or options.get("headless")
    serve_args = config_argv(ServeConfig, options, only=None if inline else web_options())
    children = [ChildSpec("serve", ("serve", *serve_args), uses_torch=bool(inline), essential=True)]
    train_values = _train_values(options)
    if not inline:
        worker_args = config_argv(SampleConfig, options)
        children += _vllm_server(options, worker_args, lora_rank=train_values["lora_r"])
        count = options.get("workers", 1)
        for i in range(count):
            name = "sample" if count == 1 else f"sample{i + 1}"
            children.append(ChildSpec(name, ("sample", *worker_args)))
    if not options["no_train"]:
        train_args = config_argv(TrainConfig, options, only=set(options)) + shlex.split(options["train_args"])
        finishes = options["max_steps"] is not None or options["until_version"] is not None
        children.append(ChildSpec("train", ("train", *train_args), finishes=finishes,
                                  nice=options["background_nice"]))
    if options["judge_spec"]:
        mode = () if options["auto_label"] else ("--shadow",)
        model_judge = options["judge_spec"].split(":", 1)[0] in ("hf", "rm")  # rule/py/openai: no torch work
        children.append(ChildSpec("judge", ("judge", "--judge", options["judge_spec"], *mode,
                                            *shlex.split(options["judge_args"])), uses_torch=model_judge,
                                  nice=options["background_nice"]))
    return children


def _train_values(options: dict[str, Any]) -> dict[str, Any]:
    """`odpo train`'s parsed options as up will start it (--train-args included): a bad
    --train-args is one usage line here, before any child starts."""
    from odpo.app.cli.train import train

    args = config_argv(TrainConfig, options, only=set(options)) + shlex.split(options.get("train_args") or "")
    try:
        with train.make_context("train", args) as ctx:
            return dict(ctx.params)
    except click.ClickException as exc:
        raise click.UsageError(f"--train-args: {exc.format_message()}") from None


def _vllm_server(options: dict[str, Any], worker_args: list[str], *, lora_rank: int) -> list[Any]:
    """`--sampler vllm` without --vllm-url: a `vllm serve` child (through `odpo vllm-serve`) on
    VLLM_PORT, and the workers pointed at it (worker_args grows in place)."""
    from odpo.app.up import ChildSpec

    if options.get("backend") != "vllm" or options.get("vllm_urls"):
        return []
    from odpo.trainer.sampling.vllm_client import VllmError
    from odpo.trainer.sampling.vllm_launch import find_vllm

    try:
        executable = find_vllm(options.get("vllm_bin"))
    except VllmError as exc:
        raise click.UsageError(f"--sampler vllm without --vllm-url: {exc}") from None
    worker_args += ["--vllm-url", f"http://127.0.0.1:{VLLM_PORT}"]
    given_bin = ("--vllm-bin", executable) if options.get("vllm_bin") else ()  # else the child finds the same one
    return [ChildSpec("vllm", ("vllm-serve", "--model", options["model"], "--port", str(VLLM_PORT),
                               "--max-lora-rank", str(lora_rank),
                               "--max-loras", str(options.get("max_staleness", 1) + 1), *given_bin))]
