"""`odpo bench <name>`: run a benchmark, write its JSON result, print a short table.

    odpo bench sampling --quick            one bench, small enough for a laptop CPU
    odpo bench all --quick                 every bench in sequence, then the summary table
    odpo bench report                      the README table from the result files in --out

Defaults are sized for a GPU; --quick runs each bench in a few minutes on 2 CPU cores. Benches work
in scratch data directories (the model cache is shared), never in your own database.

The product never imports this package: the main CLI loads the `bench` group lazily, by name, only
when `odpo bench` runs. The `bench` extra (TRL, datasets) adds the train-step comparison with TRL.
"""
from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import click

from odpo.app.config import CommonConfig
from odpo.bench.common import default_out_dir
from odpo.bench.learn import DEFAULT_RULE as LEARN_RULE
from odpo.trainer.options import DEFAULT_MODEL, DEFAULT_PASSES, LOSS_TYPES

log = logging.getLogger(__name__)

RUNNERS = {"sampling": "odpo.bench.sampling", "train-step": "odpo.bench.train_step", "reload": "odpo.bench.reload",
           "labelers": "odpo.bench.labelers", "learn": "odpo.bench.learn", "memory": "odpo.bench.memory",
           "first-pair": "odpo.bench.first_pair"}
# long fault soaks: run by name only, never by `bench all`
SOAKS = {"chaos": "odpo.bench.chaos", "faults": "odpo.bench.faults"}
OUT_DIR_HELP = "bench/results"  # what --help shows; default_out_dir() says where that is


def _shared(fn: Callable) -> Callable:
    options = [
        click.option("--quick", is_flag=True, help="Small sizes: a few minutes on 2 CPU cores."),
        click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
                     default=default_out_dir, show_default=OUT_DIR_HELP, help="Where result JSON files go."),
        click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model spec (as for odpo serve)."),
        click.option("--device", default="auto", show_default=True),
        click.option("--dtype", default="auto", show_default=True),
        click.option("--threads", type=click.IntRange(1), default=None,
                     help="torch CPU threads here and in child processes [default: torch's choice]."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--keep-scratch", is_flag=True, help="Keep the scratch data directories (logs, DB)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _csv(_ctx: Any, _param: Any, value: Any) -> tuple[str, ...]:
    """A comma-separated option as a tuple of its non-empty parts."""
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _ints(values: tuple[str, ...], name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except ValueError:
        raise click.BadParameter(f"{','.join(values)} is not a list of label counts", param_hint=name) from None
    if any(v < 1 for v in out):
        raise click.BadParameter("label counts are positive", param_hint=name)
    return out


def bench_context(common: CommonConfig, opts: dict[str, Any]) -> Any:
    """Pop the shared options into a BenchContext; what is left are the bench's own options."""
    from odpo.bench.common import BenchContext

    keys = ("quick", "out_dir", "model", "device", "dtype", "threads", "seed", "keep_scratch")
    return BenchContext(common=common, **{k: opts.pop(k) for k in keys})


def apply_threads(threads: int | None) -> None:
    """One thread count for this process and its children (OMP_NUM_THREADS is inherited)."""
    if not threads:
        return
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def execute(name: str, ctx: Any, options: dict[str, Any]) -> Any:
    """Run one bench; a crash becomes a "failed" result (with the reason) rather than no file."""
    from odpo.bench.common import BenchResult, machine_description, result_table, utc_now_iso

    apply_threads(ctx.threads)
    for noisy in ("httpx", "gradio_client", "urllib3"):  # one line per HTTP request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started, t0 = utc_now_iso(), time.perf_counter()
    machine = machine_description()
    runner = importlib.import_module({**RUNNERS, **SOAKS}[name]).run
    try:
        result = runner(ctx, **options)
    except Exception as exc:  # noqa: BLE001 - recorded in the result and reported in one line
        log.error("bench %s failed: %s", name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        result = BenchResult(bench=name, quick=ctx.quick, params=dict(options), status="failed",
                             notes=[f"{type(exc).__name__}: {exc}"])
    result.started_at, result.seconds, result.machine = started, time.perf_counter() - t0, machine
    path = result.write(ctx.out_dir)
    click.echo(result_table(result.to_dict()))
    click.echo(f"\nwrote {path} ({result.seconds:.0f} s)\n")
    return result


def _finish(result: Any) -> None:
    if result.status == "failed":
        raise click.ClickException(f"bench {result.bench} failed: {result.notes[0] if result.notes else ''}")


@click.group()
def bench() -> None:
    """Benchmarks: sampling, train-step, reload, labelers, learn, memory (or all)."""


@bench.command()
@_shared
@click.option("--prompts-per-batch", type=click.IntRange(1), default=None)
@click.option("--rounds", type=click.IntRange(1), default=None)
@click.option("--max-new-tokens", type=click.IntRange(1), default=None)
@click.option("--candidates", type=click.IntRange(2), default=2, show_default=True,
              help="Also time K candidates per prompt, with and without the margin selector's scoring, per shown pair.")
@click.option("--sampler", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="vllm: also time the vLLM backend on the same prompts (needs --vllm-url).")
@click.option("--vllm-url", default=None, metavar="URL",
              help="A vLLM server serving --model under that name (`odpo vllm-serve --model M`).")
@click.pass_obj
def sampling(common: CommonConfig, **opts: Any) -> None:
    """Pairs/minute: batched sampling vs one pair at a time (and the vLLM backend beside it)."""
    if opts["sampler"] == "vllm" and not opts["vllm_url"]:
        raise click.UsageError("--sampler vllm needs --vllm-url URL (start one with `odpo vllm-serve`)")
    _finish(execute("sampling", bench_context(common, opts), opts))


@bench.command("train-step")
@_shared
@click.option("--batch-size", type=click.IntRange(1), default=None)
@click.option("--max-new-tokens", type=click.IntRange(1), default=None)
@click.option("--rounds", type=click.IntRange(1), default=None)
@click.option("--rule", default="rule:shorter", show_default=True, help="Judge for both odpo and TRL.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=2e-4, show_default=True)
@click.option("--load-in-4bit", is_flag=True,
              help="Also run odpo's rounds on a 4-bit NF4 base (QLoRA), reported beside full precision.")
@click.pass_obj
def train_step(common: CommonConfig, **opts: Any) -> None:
    """Seconds per judged pair: odpo vs TRL's OnlineDPOTrainer, same model/LoRA/batch/length."""
    _finish(execute("train-step", bench_context(common, opts), opts))


@bench.command()
@_shared
@click.option("--versions", type=click.IntRange(1), default=None)
@click.option("--max-new-tokens", type=click.IntRange(1), default=None)
@click.option("--prompts-per-batch", type=click.IntRange(1), default=None)
@click.option("--interval", "interval_s", type=click.FloatRange(0), default=None,
              help="Mean seconds between commits (the trainer's step time).")
@click.pass_obj
def reload(common: CommonConfig, **opts: Any) -> None:
    """Hot-swap ms and commit-to-serving latency over committed versions."""
    _finish(execute("reload", bench_context(common, opts), opts))


@bench.command()
@_shared
@click.option("--labelers", type=click.IntRange(1), default=None)
@click.option("--seconds", type=click.FloatRange(1), default=None)
@click.option("--think", "think_s", type=click.FloatRange(0), default=None, help="Seconds each labeler reads a pair.")
@click.option("--queue-size", type=click.IntRange(1), default=None)
@click.option("--max-new-tokens", type=click.IntRange(1), default=None)
@click.option("--prompts-per-batch", type=click.IntRange(1), default=None)
@click.option("--rule", default="rule:shorter", show_default=True, help="Judge deciding the labelers' votes.")
@click.option("--rate-labelers", type=click.IntRange(0), default=20, show_default=True,
              help="Then measure the sampler worker's pairs/min alone and with this many labelers polling (0: skip).")
@click.option("--rate-window", type=click.FloatRange(10), default=None, help="Seconds per rate window.")
@click.option("--flooder", is_flag=True,
              help="One more labeler sends typed prompts and pair requests as fast as it can the whole time: the "
                   "others' waits must not suffer (per-labeler rate limits).")
@click.pass_obj
def labelers(common: CommonConfig, **opts: Any) -> None:
    """The real app (odpo up) under simulated labelers voting over HTTP."""
    _finish(execute("labelers", bench_context(common, opts), opts))


@bench.command()
@_shared
@click.option("--rules", callback=_csv, default=None,
              help=f"Comma-separated labelers (rule: or py: judges). [default: {LEARN_RULE} with --quick, "
                   "and rule:say_the_early beside it]")
@click.option("--losses", callback=_csv, default=None, help="Comma-separated: sigmoid,simpo (any of odpo's losses).")
@click.option("--modes", callback=_csv, default=None,
              help="Comma-separated: online,iterative,offline; online+SELECTOR samples --candidates per prompt "
                   "and shows the pair the selector picks (online+margin, online+uncertain, online+diverse).")
@click.option("--candidates", type=click.IntRange(2), default=4, show_default=True,
              help="Candidates per prompt of the online+SELECTOR arms.")
@click.option("--seeds", type=click.IntRange(1), default=None,
              help="Seeds per cell, from --seed on. [3; 1 with --quick]")
@click.option("--budget", type=click.IntRange(1), default=None, help="Labels per arm. [200; 48 with --quick]")
@click.option("--curve", callback=_csv, default=None,
              help="Label counts to evaluate at, e.g. 50,100,150 (the budget always).")
@click.option("--round-labels", type=click.IntRange(1), default=None,
              help="Labels per round of the iterative mode. [the first curve point]")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=None)
@click.option("--eval-n", type=click.IntRange(1), default=None, help="Held-out comparisons per evaluation.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
              help="Learning rate of every arm. [default: 1e-3 with --quick, else 5e-4]")
@click.option("--beta", type=click.FloatRange(0, min_open=True), default=None,
              help="Beta of every arm. [each loss's default: 0.1, 2.0 for simpo]")
@click.option("--passes", type=click.IntRange(1, 8), default=DEFAULT_PASSES, show_default=True,
              help="Optimizer updates on each batch of labels, every arm (odpo train --passes); an arm with "
                   "more than one is named 'MODE (P passes)'.")
@click.option("--load-in-4bit", is_flag=True,
              help="Every arm on a 4-bit NF4 base (QLoRA). Writes learn[-quick].json like a full-precision "
                   "run: give it its own --out to keep both.")
@click.pass_obj
def learn(common: CommonConfig, **opts: Any) -> None:
    """The learn table: win rate vs base per mode x loss x rule, pooled over seeds, with curves."""
    from odpo.bench.learn import LOSSES, MODES, SELECTED_MODES

    if opts["curve"]:
        opts["curve"] = _ints(opts["curve"], "--curve")
    losses = LOSSES + tuple(t for t in LOSS_TYPES if t not in LOSSES)
    for key, allowed in (("modes", MODES + SELECTED_MODES), ("losses", losses)):
        bad = [v for v in opts[key] or () if v not in allowed]
        if bad:
            raise click.BadParameter(f"{', '.join(bad)} (choose from {', '.join(allowed)})", param_hint=f"--{key}")
    _finish(execute("learn", bench_context(common, opts), opts))


@bench.command("learn-merge")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=default_out_dir,
              show_default=OUT_DIR_HELP)
def learn_merge(files: tuple[Path, ...], out_dir: Path) -> None:
    """Pool several `odpo bench learn` results (e.g. one run per seed) into one learn table."""
    import json

    from odpo.bench.common import result_table
    from odpo.bench.learn_table import merge

    try:
        result = merge([json.loads(f.read_text()) for f in files], out_dir)
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"cannot merge: {exc}") from None
    path = result.write(out_dir)
    click.echo(result_table(result.to_dict()))
    click.echo(f"\nwrote {path}\n")


@bench.command()
@_shared
@click.option("--steps", type=click.IntRange(1), default=None, help="Train steps before stopping.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=None)
@click.option("--prompts-per-batch", type=click.IntRange(1), default=None)
@click.option("--load-in-4bit", is_flag=True,
              help="Run odpo up again with --load-in-4bit and report its peaks beside full precision's.")
@click.pass_obj
def memory(common: CommonConfig, **opts: Any) -> None:
    """Peak RSS (and GPU memory) of serve and train."""
    _finish(execute("memory", bench_context(common, opts), opts))


@bench.command()
@_shared
@click.option("--scenarios", callback=_csv, default=None,
              help="Comma-separated: db_restart,db_outage,disk_full,worker_stall,judge_hang [default: all].")
@click.option("--databases", callback=_csv, default=None, help="Comma-separated: sqlite,postgresql [default: both].")
@click.option("--outage", "outage_s", type=click.FloatRange(1), default=None,
              help="Seconds each fault lasts. [default: 20 with --quick, else 60]")
@click.pass_obj
def faults(common: CommonConfig, **opts: Any) -> None:
    """The ground pulled from under a running loop: the database away, a full disk, a stalled worker,
    a hanging judge; each must resume with nothing lost (a soak: run by name, never by `bench all`)."""
    from odpo.bench.faults import SCENARIOS

    bad = [s for s in opts["scenarios"] or () if s not in SCENARIOS]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)} (choose from {', '.join(SCENARIOS)})", param_hint="--scenarios")
    opts["scenarios"] = tuple(opts["scenarios"] or ())
    opts["databases"] = tuple(opts["databases"] or ("sqlite", "postgresql"))
    _finish(execute("faults", bench_context(common, opts), opts))


@bench.command()
@_shared
@click.option("--minutes", type=click.FloatRange(0.5), default=None,
              help="How long to soak. [default: 6 with --quick, else 30]")
@click.option("--labelers", type=click.IntRange(0), default=None, help="Simulated labelers over HTTP.")
@click.option("--rule", default="rule:say_the_early", show_default=True, help="The auto-labeling judge.")
@click.pass_obj
def chaos(common: CommonConfig, **opts: Any) -> None:
    """odpo up under SIGKILLs (serve, train, judge, up) and racing labelers; then the ledger invariants."""
    _finish(execute("chaos", bench_context(common, opts), opts))


@bench.command("first-pair")
@_shared
@click.option("--runs", type=click.IntRange(1), default=None, help="Fresh starts to time. [5; 2 with --quick]")
@click.pass_obj
def first_pair(common: CommonConfig, **opts: Any) -> None:
    """Seconds from `odpo up` to the page and to the first pair (a fresh data dir, the model converted)."""
    _finish(execute("first-pair", bench_context(common, opts), opts))


@bench.command("gpu-smoke", add_help_option=False,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def gpu_smoke(common: CommonConfig, args: tuple[str, ...]) -> None:
    """GPU smoke: LoRA and QLoRA DPO steps, hf sampler, hot reload, exports (--help: its options)."""
    from odpo.bench.gpu_smoke import main  # the same options as `python bench/gpu_smoke.py`

    raise SystemExit(main(list(args), default_cache_dir=common.model_cache_dir, prog="odpo bench gpu-smoke"))


@bench.command("all")
@_shared
@click.pass_obj
def all_benches(common: CommonConfig, **opts: Any) -> None:
    """Every bench in sequence with its default (or --quick) sizes, then the summary table."""
    from odpo.bench.common import readme_table

    ctx = bench_context(common, opts)
    results = [execute(name, ctx, {}) for name in RUNNERS]
    click.echo(readme_table([r.to_dict() for r in results]))
    failed = [r.bench for r in results if r.status == "failed"]
    if failed:
        raise click.ClickException(f"failed: {', '.join(failed)}")


@bench.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=default_out_dir,
              show_default=OUT_DIR_HELP)
def report(out_dir: Path) -> None:
    """The Markdown table of every result file in --out (for the README)."""
    from odpo.bench.common import load_results, readme_table

    results = load_results(out_dir)
    if not results:
        raise click.ClickException(f"no bench results in {out_dir}; run `odpo bench all --quick` first")
    click.echo(readme_table(results))
    machine = results[0]["machine"]
    click.echo(f"\nMachine: {machine.get('cpu_model')}, {machine.get('cores')} cores, {machine.get('device')}, "
               f"torch {machine['versions'].get('torch')}, transformers {machine['versions'].get('transformers')}")
