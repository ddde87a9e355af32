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

SHARED_OPTIONS = [  # options that serve and train both take, so `up` passes them to both
    click.option("--model", default="smollm2-135m", show_default=True,
                 help="Base model: smollm2-135m (bundled), a checkpoint dir, a .gguf file or a hub id."),
    click.option("--run", default="default", show_default=True, help="Run name (runs/<run>/adapters)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
    click.option("--dtype", default="auto", show_default=True, help="auto, fp32, bf16 or fp16."),
    click.option("--load-in-4bit", is_flag=True,
                 help="QLoRA: the base model's linear layers in 4-bit NF4 (bitsandbytes; CUDA and CPU)."),
    click.option("--seed", type=int, default=0, show_default=True),
]
SAMPLER_OPTIONS = [  # options of a sampler: `odpo sample`, and serve's inline sampler
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
    click.option("--kv-cache", type=click.Choice(("dynamic", "static")), default="dynamic", show_default=True,
                 help="KV cache used while sampling."),
    click.option("--sample-autocast", is_flag=True, help="bf16 autocast while sampling (see README benchmarks)."),
    click.option("--sampler-nice", type=click.IntRange(0, 19), default=BACKGROUND_NICE, show_default=True,
                 help="Nice increment of the sampler, so votes are answered first on a busy CPU. 0 = off."),
    click.option("--human-eval-share", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
                 help="Share of the pairs people see that are blind eval pairs (a held-out prompt, the serving "
                      "version against the base): 0.1 = 1 in 10; 0 = off. Their votes are never trained on."),
    click.option("--human-eval-reference", type=click.IntRange(0), default=0, show_default=True, metavar="VERSION",
                 help="What eval pairs compare the serving version against: 0 = the base, N = committed version N."),
    click.option("--sampler", "backend", type=click.Choice(("hf", "vllm")), default="hf", show_default=True,
                 help="hf: transformers in the worker; vllm: OpenAI-compatible vLLM servers (--vllm-url), "
                      "which load each version as a LoRA adapter."),
    click.option("--vllm-url", "vllm_urls", default="", metavar="URL[,URL...]",
                 help="vLLM servers (started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."),
]
WEB_OPTIONS = [
    click.option("--host", default="127.0.0.1", show_default=True,
                 help="Interface to bind; 0.0.0.0 exposes the app to your network."),
    click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True),
    click.option("--headless", is_flag=True, help="No web app: an inline sampler only (prefer `odpo sample`)."),
    click.option("--claim-timeout", "claim_timeout_s", type=click.FloatRange(0, min_open=True), default=600.0,
                 show_default=True, help="Seconds before an unanswered pair goes back to the queue."),
    click.option("--guidelines", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
                 help="Markdown file shown next to the pair."),
    click.option("--auth-file", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
                 help="Labeler accounts (enables login)."),
    click.option("--show-judge-after-vote", is_flag=True, help="Show a judge's verdict once a person voted."),
    click.option("--admin", "admins", multiple=True, metavar="NAME", help="Labeler name with admin rights."),
    click.option("--inline-sampler", is_flag=True,
                 help="Sample in the web server's process (one program; no `odpo sample` workers needed)."),
]
SERVE_OPTIONS = SAMPLER_OPTIONS + WEB_OPTIONS


def apply_options(options: list) -> Callable:
    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def serve_config(options: dict[str, Any]) -> Any:
    """Click values -> ServeConfig; its checks become one-line usage errors."""
    from odpo.app.config import ServeConfig

    return _config(ServeConfig, options)


def sample_config(options: dict[str, Any]) -> Any:
    from odpo.app.config import SampleConfig

    return _config(SampleConfig, options)


def _config(kind: Any, options: dict[str, Any]) -> Any:
    values = {k: v for k, v in options.items() if k in kind.__dataclass_fields__}
    if "vllm_urls" in values:
        values["vllm_urls"] = tuple(u.strip() for u in (values["vllm_urls"] or "").split(",") if u.strip())
    try:
        return kind(**values)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.command()
@apply_options(SHARED_OPTIONS)
@apply_options(SERVE_OPTIONS)
@click.pass_obj
def serve(cfg: CommonConfig, admins: tuple[str, ...], **options: Any) -> None:
    """The labeling web app. Pairs come from `odpo sample` workers (or --inline-sampler)."""
    from odpo.app.lifecycle import exit_now
    from odpo.app.serve import run_serve

    config = serve_config(options)
    if not config.inline_sampler:
        given = click.get_current_context().get_parameter_source
        ignored = [p.opts[0] for p in _options_of(SAMPLER_OPTIONS)
                   if given(p.name) not in (None, click.core.ParameterSource.DEFAULT)]
        if ignored:
            log.warning("serve holds no model: %s apply to `odpo sample` workers (or add --inline-sampler)",
                        ", ".join(ignored))
    run_serve(cfg, config, admins=set(admins))
    exit_now(0)  # skip the interpreter's seconds-long teardown (see exit_now)


@click.command()
@apply_options(SHARED_OPTIONS)
@apply_options(SERVE_OPTIONS)
@click.option("--workers", type=click.IntRange(0), default=1, show_default=True,
              help="`odpo sample` workers to start (0 with --inline-sampler, or with workers run elsewhere).")
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
    """Start everything on this machine: serve, sampler workers, train (and a judge), with one log."""
    from odpo.app.services.prompts import ensure_initialised
    from odpo.app.up import RestartPolicy, Supervisor, database_report

    cfg: CommonConfig = ctx.obj
    if options["auto_label"] and not options["judge_spec"]:
        raise click.UsageError("--auto-label needs --judge SPEC")
    vllm_started = options["backend"] == "vllm" and not options["vllm_urls"]  # up starts `vllm serve`
    serve_config({**options, "vllm_urls": f"http://127.0.0.1:{VLLM_PORT}"} if vllm_started else options)
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
    """The child commands `odpo up` runs, from its options: serve (the web app), the sampler
    workers (unless serve samples inline), the trainer and a judge."""
    from odpo.app.up import ChildSpec

    shared = {p.name for p in _options_of(SHARED_OPTIONS)}
    inline = options.get("inline_sampler") or options.get("headless")
    sampling = {p.name for p in _options_of(SAMPLER_OPTIONS)}
    web = {p.name for p in _options_of(WEB_OPTIONS)} | {"run"}  # a serve without a model needs no more
    serve_args = _as_args([p for p in serve_params if inline or p.name in web], options)
    children = [ChildSpec("serve", ("serve", *serve_args), uses_torch=bool(inline))]
    if not inline:
        worker_args = _as_args([p for p in serve_params if p.name in shared | sampling], options)
        children += _vllm_server(options, worker_args)
        count = options.get("workers", 1)
        for i in range(count):
            name = "sample" if count == 1 else f"sample{i + 1}"
            children.append(ChildSpec(name, ("sample", *worker_args)))
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


VLLM_PORT = 8000


def _vllm_server(options: dict[str, Any], worker_args: list[str]) -> list[Any]:
    """`--sampler vllm` without --vllm-url: a `vllm serve` child (through `odpo vllm-serve`) on
    VLLM_PORT, and the workers pointed at it (worker_args grows in place)."""
    from odpo.app.up import ChildSpec

    if options.get("backend") != "vllm" or options.get("vllm_urls"):
        return []
    from odpo.trainer.vllm_backend import vllm_available

    if not vllm_available():
        raise click.UsageError("--sampler vllm needs --vllm-url URL[,URL...], or the vllm package installed here "
                               "so that odpo up can start `vllm serve` itself")
    worker_args += ["--vllm-url", f"http://127.0.0.1:{VLLM_PORT}"]
    rank = _train_option(options.get("train_args", ""), "--lora-r", default="16")
    return [ChildSpec("vllm", ("vllm-serve", "--model", options["model"], "--port", str(VLLM_PORT),
                               "--max-lora-rank", rank, "--max-loras", str(options.get("max_staleness", 1) + 1)))]


def _train_option(train_args: str, flag: str, *, default: str) -> str:
    """A value from --train-args (the LoRA rank the trainer will write), else `default`."""
    args = shlex.split(train_args or "")
    return args[args.index(flag) + 1] if flag in args[:-1] else default


def _options_of(decorators: list) -> list[click.Option]:
    """The click.Option objects a list of decorators would add (to read their names)."""
    probe = apply_options(decorators)(click.command()(lambda **_: None))
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
