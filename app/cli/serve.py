"""`odpo serve` (web app + sampler + hot reload) and `odpo up` (serve + train [+ judge], one command).

Heavy imports (torch, transformers, gradio) happen inside the commands, so `odpo --help` is fast.
"""
from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any, Callable

import click

from odpo.app.config import CommonConfig
from odpo.trainer.priority import BACKGROUND_NICE

log = logging.getLogger(__name__)

_SHARED = [  # options that serve and train both take, so `up` passes them to both
    click.option("--model", default="smollm2-135m", show_default=True,
                 help="Base model: smollm2-135m (bundled), a checkpoint dir, a .gguf file or a hub id."),
    click.option("--run", default="default", show_default=True, help="Run name (runs/<run>/adapters)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
    click.option("--dtype", default="auto", show_default=True, help="auto, fp32, bf16 or fp16."),
    click.option("--load-in-4bit", is_flag=True,
                 help="QLoRA: the base model's linear layers in 4-bit NF4 (bitsandbytes; CUDA and CPU)."),
    click.option("--seed", type=int, default=0, show_default=True),
]
_SERVE = [
    click.option("--host", default="127.0.0.1", show_default=True,
                 help="Interface to bind; 0.0.0.0 exposes the app to your network."),
    click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True),
    click.option("--headless", is_flag=True, help="Sampler and hot reload only, no web app."),
    click.option("--queue-size", type=click.IntRange(1), default=8, show_default=True,
                 help="Unlabeled pairs kept ready; sampling pauses when the queue is full."),
    click.option("--prompts-per-batch", type=click.IntRange(1), default=8, show_default=True,
                 help="Prompts per generate call (x2 samples each)."),
    click.option("--temperature", type=click.FloatRange(0, min_open=True), default=0.9, show_default=True),
    click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True),
    click.option("--max-new-tokens", type=click.IntRange(1), default=96, show_default=True),
    click.option("--max-staleness", type=click.IntRange(0), default=1, show_default=True,
                 help="Retire queued pairs sampled more than this many versions ago."),
    click.option("--overlap", type=click.IntRange(1), default=1, show_default=True,
                 help="How many labelers see each pair."),
    click.option("--claim-timeout", "claim_timeout_s", type=click.FloatRange(0, min_open=True), default=600.0,
                 show_default=True, help="Seconds before an unanswered pair goes back to the queue."),
    click.option("--guidelines", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
                 help="Markdown file shown next to the pair."),
    click.option("--auth-file", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
                 help="Labeler accounts (enables login)."),
    click.option("--show-judge-after-vote", is_flag=True, help="Show a judge's verdict once a person voted."),
    click.option("--admin", "admins", multiple=True, metavar="NAME", help="Labeler name with admin rights."),
    click.option("--kv-cache", type=click.Choice(("dynamic", "static")), default="dynamic", show_default=True,
                 help="KV cache used while sampling."),
    click.option("--sample-autocast", is_flag=True, help="bf16 autocast while sampling (see README benchmarks)."),
    click.option("--sampler-nice", type=click.IntRange(0, 19), default=BACKGROUND_NICE, show_default=True,
                 help="Nice increment of the sampler thread, so votes are answered first on a busy CPU. 0 = off."),
    click.option("--human-eval-share", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
                 help="Share of the pairs people see that are blind eval pairs (a held-out prompt, the serving "
                      "version against the base): 0.1 = 1 in 10; 0 = off. Their votes are never trained on."),
]


def _apply(options: list) -> Callable:
    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def serve_config(options: dict[str, Any]) -> Any:
    """Click values -> ServeConfig; its checks become one-line usage errors."""
    from odpo.app.config import ServeConfig

    fields = set(ServeConfig.__dataclass_fields__)
    try:
        return ServeConfig(**{k: v for k, v in options.items() if k in fields})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.command()
@_apply(_SHARED)
@_apply(_SERVE)
@click.pass_obj
def serve(cfg: CommonConfig, admins: tuple[str, ...], **options: Any) -> None:
    """The labeling web app plus the on-policy sampler and hot reload of new adapter versions."""
    from odpo.app.serve import exit_now, run_serve

    run_serve(cfg, serve_config(options), admins=set(admins))
    exit_now(0)  # skip the interpreter's seconds-long teardown (see exit_now)


@click.command()
@_apply(_SHARED)
@_apply(_SERVE)
@click.option("--judge", "judge_spec", default=None, metavar="SPEC",
              help="Also run `odpo judge --judge SPEC` (shadow labels for agreement stats; see --auto-label).")
@click.option("--auto-label", is_flag=True, help="Let the judge label queued pairs (needs --judge).")
@click.option("--no-train", is_flag=True, help="Do not start the trainer.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Passed to train: pairs per step.")
@click.option("--save-every", type=click.IntRange(1), default=None, help="Passed to train.")
@click.option("--max-steps", type=click.IntRange(1), default=None,
              help="Passed to train; `up` exits 0 when train finishes.")
@click.option("--until-version", type=click.IntRange(1), default=None,
              help="Passed to train; `up` exits 0 when that version is committed.")
@click.option("--train-args", default="", metavar="ARGS", help="Extra `odpo train` options, e.g. '--beta 0.2'.")
@click.option("--judge-args", default="", metavar="ARGS", help="Extra `odpo judge` options.")
@click.option("--grace", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds a child gets to stop before it is killed. A trainer stopped mid-step finishes the "
                   "step and commits what it has (measured 16 s for a batch-8 step of the default model on 2 "
                   "loaded CPU cores); killing it earlier is safe but replays those steps.")
@click.option("--max-restarts", type=click.IntRange(0), default=5, show_default=True,
              help="Restart a crashed child up to this many times in a row (a child that ran 60 s starts "
                   "a fresh count); then give up on it. 0: a crash stops everything.")
@click.option("--restart-delay", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Seconds before the first restart; doubled per crash in a row, at most 30.")
@click.option("--background-nice", type=click.IntRange(0, 19), default=BACKGROUND_NICE, show_default=True,
              help="Nice increment of the trainer and judge processes (background work yields to the web app).")
@click.pass_context
def up(ctx: click.Context, **options: Any) -> None:
    """Start everything on this machine: serve, train (and a judge), with one log. Ctrl-C stops all."""
    from odpo.app.services.prompts import ensure_initialised
    from odpo.app.up import RestartPolicy, Supervisor, database_report

    cfg: CommonConfig = ctx.obj
    if options["auto_label"] and not options["judge_spec"]:
        raise click.UsageError("--auto-label needs --judge SPEC")
    serve_config(options)  # validate before starting anything
    if not options["headless"]:
        from odpo.app.serve import check_listen_address, ui_available

        if ui_available():
            check_listen_address(options["host"], options["port"])
    added = ensure_initialised(cfg)
    if added:
        click.echo(f"[up] first start: imported {added} starter prompts into {cfg.db_url}")
    children = up_children(options, serve_params=serve.params)
    restart = RestartPolicy(max_restarts=options["max_restarts"], first_delay_s=options["restart_delay"])
    db = cfg.open_db()
    try:
        code = Supervisor(children, global_args=global_args(ctx), grace_s=options["grace"], restart=restart,
                          report=database_report(db, run=options["run"])).run()
    finally:
        db.close()
    ctx.exit(code)


def global_args(ctx: click.Context) -> list[str]:
    """The root options the children need to see the same data and log at the same level."""
    cfg: CommonConfig = ctx.obj
    args = ["--data-dir", str(cfg.data_dir), "--db", cfg.db_url]
    verbose = (ctx.parent.params.get("verbose") if ctx.parent else 0) or 0
    return args + ["-v"] * verbose


def up_children(options: dict[str, Any], *, serve_params: list[click.Parameter]) -> list[Any]:
    """The child commands `odpo up` runs, from its options."""
    from odpo.app.up import ChildSpec

    shared = {p.name for p in _options_of(_SHARED)}
    serve_args = _as_args(serve_params, options)
    children = [ChildSpec("serve", ("serve", *serve_args))]
    if not options["no_train"]:
        train_names = shared | {"batch_size", "save_every", "max_steps", "until_version"}
        from odpo.app.cli.train import train as train_cmd

        train_args = _as_args([p for p in train_cmd.params if p.name in train_names], options)
        finishes = options["max_steps"] is not None or options["until_version"] is not None
        children.append(ChildSpec("train", ("train", *train_args, *shlex.split(options["train_args"])),
                                  finishes=finishes, nice=options["background_nice"]))
    if options["judge_spec"]:
        mode = () if options["auto_label"] else ("--shadow",)
        model_judge = options["judge_spec"].split(":", 1)[0] in ("hf", "rm")  # rule/py/openai: no torch work
        children.append(ChildSpec("judge", ("judge", "--judge", options["judge_spec"], *mode,
                                            *shlex.split(options["judge_args"])), uses_torch=model_judge,
                                  nice=options["background_nice"], essential=False))
    return children


def _options_of(decorators: list) -> list[click.Option]:
    """The click.Option objects a list of decorators would add (to read their names)."""
    probe = _apply(decorators)(click.command()(lambda **_: None))
    return [p for p in probe.params if isinstance(p, click.Option)]


def _as_args(params: list[click.Parameter], values: dict[str, Any]) -> list[str]:
    """Re-emit the options whose value differs from the default, as command-line arguments."""
    args: list[str] = []
    for p in params:
        if not isinstance(p, click.Option) or p.name not in values:
            continue
        value, flag = values[p.name], p.opts[0]
        if value is None or value == p.default or (p.multiple and not value):
            continue
        if p.is_flag:
            args += [flag] if value else list(p.secondary_opts[:1])
        elif p.multiple:
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args
