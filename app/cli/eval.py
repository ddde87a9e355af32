"""`odpo eval --a vN --b base|vM --judge SPEC`: win rate of one policy version over another.

`odpo eval --human [--n 20] [--version vN] [--reference base|vM]` queues blind eval pairs for people
instead (trainer/evaluation/blind_pairs.py): their votes show as the human win rate on the dashboard."""
from __future__ import annotations

import json
import re
from typing import Any, Optional

import click

from odpo.app.cli.judge import SPEC_HELP, build_judge_options, judge_options
from odpo.app.config import CommonConfig
from odpo.db.errors import OdpoError
from odpo.trainer.options import EVAL_MAX_NEW_TOKENS, EVAL_TEMPERATURE, EVAL_TOP_P

_VERSION_RE = re.compile(r"^v?(\d+)$")


class VersionSpecError(OdpoError):
    """A --a/--b value that names no version."""


def parse_policy(text: str, *, run: str) -> tuple[str, str]:
    """'RUN:vN' -> (RUN, 'vN'); a bare version spec belongs to `run` (--run)."""
    head, sep, tail = text.strip().rpartition(":")
    return (head, tail) if sep and head else (run, text.strip())


def parse_version(text: str, *, latest: int) -> int:
    """'base' -> 0, 'vN' or 'N' -> N, 'latest' -> the latest committed version."""
    value = text.strip().lower()
    if value == "base":
        return 0
    if value == "latest":
        return latest
    match = _VERSION_RE.match(value)
    if not match:
        raise VersionSpecError(f"cannot read version {text!r}: use base, latest, or vN (e.g. v3)")
    return int(match.group(1))


def describe(result: Any) -> str:
    w = result.win_rate
    run_b = result.details.get("run_b")
    a = f"{result.details['run']}:v{result.version_a}" if run_b else f"v{result.version_a}"
    b = "base" if result.version_b == 0 else f"{run_b}:v{result.version_b}" if run_b else f"v{result.version_b}"
    return (f"{a} vs {b}, judge {result.judge}: win rate {w.rate:.3f} "
            f"[{w.low:.3f}, {w.high:.3f}] (95% Wilson, ties count half), n={w.n}: {w.wins} wins, "
            f"{w.losses} losses, {w.ties} ties; {result.abstained} abstained (eval #{result.eval_id})")


@click.command("eval")
@click.option("--a", "--version", "version_a", default="latest", show_default=True,
              help="Policy A: vN, latest or base of --run, or RUN:vN (another run of the same base model).")
@click.option("--b", "--reference", "version_b", default="base", show_default=True,
              help="Policy B: base, vM or latest of --run, or RUN:vM: two runs head to head.")
@click.option("--judge", "spec", default=None, envvar="ODPO_JUDGE", metavar="SPEC",
              help=SPEC_HELP + " Required unless --human.")
@click.option("--human", is_flag=True,
              help="Queue blind eval pairs for people instead of judging: n held-out prompts answered by "
                   "--version and --reference, labeled like any pair, never trained on.")
@click.option("--n", type=click.IntRange(1), default=None,
              help="Held-out prompts to compare on [default: 64; 20 with --human].")
@click.option("--max-new-tokens", type=click.IntRange(1), default=EVAL_MAX_NEW_TOKENS, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=EVAL_TEMPERATURE, show_default=True,
              help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=EVAL_TOP_P, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed for both policies.")
@click.option("--run", default="default", show_default=True, help="Training run name.")
@click.option("--model", "model_spec", default=None,
              help="Base model spec (default: the one the adapter was trained on).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--load-in-4bit", is_flag=True,
              help="Both policies on the base in 4-bit NF4, as a --load-in-4bit trainer trained them.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--report-to", default=None, metavar="LIST",
              help="Also log the win rate to tensorboard, wandb or trackio (comma-separated), at the step of "
                   "version A, beside the trainer's curves. [default: none]")
@click.option("--logging-dir", default=None, metavar="DIR",
              help="TensorBoard event files' directory. [default: <data-dir>/runs/<run>/tensorboard]")
@judge_options
@click.pass_obj
def eval_cmd(cfg: CommonConfig, version_a: str, version_b: str, spec: Optional[str], human: bool,
             n: Optional[int], max_new_tokens: int, temperature: float, top_p: float, seed: int, run: str,
             model_spec: Optional[str], device: str, dtype: str, load_in_4bit: bool, as_json: bool,
             report_to: Optional[str], logging_dir: Optional[str], **judge_kwargs: Any) -> None:
    """Sample both policies on the held-out prompts, judge every pair in both orders, and store the
    win rate of A over B with a 95% interval (ties count half) in the evals table. With --human,
    queue those pairs for people to judge blind instead."""
    if human and report_to:
        raise click.UsageError("--report-to logs a judged win rate; --human votes show on the dashboard")
    if human:
        sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        model = {"model_spec": model_spec, "device": device, "dtype": dtype, "load_in_4bit": load_in_4bit}
        _queue_human(cfg, version_a=version_a, version_b=version_b, n=n or 20, run=run, as_json=as_json,
                     sampling=sampling, model=model)
        return
    if not spec:
        raise click.UsageError("--judge SPEC is required (or --human to queue the pairs for people)")
    n = n or 64
    from odpo.trainer.evaluation.win_rate import load_eval_policy, run_eval
    from odpo.trainer.export.exporters import base_model_spec
    from odpo.trainer.judges import load_judge
    from odpo.trainer.sampling.generation import SamplingParams

    db, tracker = cfg.open_db(), None
    try:
        (run_a, a), (run_b, b), holds, path = _two_policies(cfg, db, run=run, specs=(version_a, version_b),
                                                           flags="--a and --b")
        judge_impl = load_judge(spec, build_judge_options(cfg, **judge_kwargs))
        tracker = _tracker(cfg, report_to, logging_dir, run=run_a, config={"a": a, "b": b, "judge": spec, "n": n})
        policy, tokenizer, autocast_dtype = load_eval_policy(
            model_spec=base_model_spec(path, model_spec), adapter_dir=path, cache_dir=cfg.model_cache_dir,
            device=device, dtype=dtype, load_in_4bit=load_in_4bit)
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
        result = run_eval(db, policy=policy, tokenizer=tokenizer, version_a=a, version_b=b, judge=judge_impl,
                          n=n, params=params, run=run_a, run_b=run_b, holds=holds, base_dir=cfg.data_dir,
                          autocast_dtype=autocast_dtype)
        judge_impl.close()
        tracker.win_rate(result, step=_version_step(db, run=run_a, version=a))
    finally:
        if tracker is not None:
            tracker.close()
        db.close()
    click.echo(json.dumps(result.summary()) if as_json else describe(result))


def _tracker(cfg: CommonConfig, report_to: Optional[str], logging_dir: Optional[str], *, run: str,
             config: dict[str, Any]) -> Any:
    """--report-to's backends, started before the model loads so a missing package is one line at once."""
    from odpo.trainer.training import tracking

    log_dir = tracking.logging_dir(logging_dir, cfg.adapters_dir(run).parent)
    return tracking.open_tracker(report_to or "none", run=run, job="eval", log_dir=log_dir, config=config)


def _version_step(db: Any, *, run: str, version: int) -> int:
    """The optimizer step a version ends on (0 = the base): the x of its win rate."""
    from odpo.db import store

    with db.sessions() as s:
        row = store.get_adapter(s, version=version, run=run) if version else None
    return row.step if row is not None else 0


def _two_policies(cfg: CommonConfig, db: Any, *, run: str, specs: tuple[str, str],
                  flags: str) -> tuple[tuple[str, int], tuple[str, int], tuple[str, int], Any]:
    """((run, version) of A, of B, the one whose adapter loads first, its directory): each spec is
    RUN:vN or a version of --run; A and B may come from two runs of the same base model."""
    from odpo.db import store
    from odpo.trainer.evaluation.win_rate import adapter_path

    keys = []
    for spec in specs:
        spec_run, version = parse_policy(spec, run=run)
        with db.sessions() as s:
            latest = store.latest_adapter(s, run=spec_run)
        keys.append((spec_run, parse_version(version, latest=latest.version if latest else 0)))
    a, b = keys
    if a == b or a[1] == b[1] == 0:
        name = f"v{a[1]}" if a[0] == b[0] else f"{a[0]}:v{a[1]}"
        raise VersionSpecError(f"{flags} both name {name}; pick two different policies"
                               + ("" if a[1] else " (no adapter version is committed yet)"))
    holds = a if a[1] else b
    return a, b, holds, adapter_path(db, version=holds[1], run=holds[0], base_dir=cfg.data_dir)


def _two_versions(cfg: CommonConfig, db: Any, *, run: str, specs: tuple[str, str],
                  flags: str) -> tuple[int, int, int, Any]:
    """(a, b, the version whose adapter loads first, its directory) from two version specs
    (vN, latest, base); the same two are refused in one line naming `flags`."""
    from odpo.db import store
    from odpo.trainer.evaluation.win_rate import adapter_path

    with db.sessions() as s:
        latest = store.latest_adapter(s, run=run)
    a, b = (parse_version(spec, latest=latest.version if latest else 0) for spec in specs)
    if a == b:
        raise VersionSpecError(f"{flags} both name v{a}; pick two different policies"
                               + ("" if latest else " (no adapter version is committed yet)"))
    holds = a or b
    return a, b, holds, adapter_path(db, version=holds, run=run, base_dir=cfg.data_dir)


def _queue_human(cfg: CommonConfig, *, version_a: str, version_b: str, n: int, run: str, as_json: bool,
                 sampling: dict[str, Any], model: dict[str, Any]) -> None:
    """`odpo eval --human`: answer n held-out prompts with both versions and queue them as blind
    eval pairs in one transaction; `odpo serve` shows them to people like any pair."""
    from odpo.trainer.evaluation.blind_pairs import queue_human_eval
    from odpo.trainer.evaluation.win_rate import load_eval_policy
    from odpo.trainer.export.exporters import base_model_spec
    from odpo.trainer.sampling.generation import SamplingParams

    db = cfg.open_db()
    try:
        a, b, holds, path = _two_versions(cfg, db, run=run, specs=(version_a, version_b),
                                          flags="--version and --reference")
        policy, tokenizer, autocast_dtype = load_eval_policy(
            model_spec=base_model_spec(path, model["model_spec"]), adapter_dir=path, cache_dir=cfg.model_cache_dir,
            device=model["device"], dtype=model["dtype"], load_in_4bit=model["load_in_4bit"])
        ids = queue_human_eval(db, policy=policy, tokenizer=tokenizer, version=a, reference=b, n=n,
                               params=SamplingParams(**sampling), run=run, holds=holds, base_dir=cfg.data_dir,
                               autocast_dtype=autocast_dtype)
    finally:
        db.close()
    ref = "base" if b == 0 else f"v{b}"
    click.echo(json.dumps({"queued": len(ids), "version": a, "reference": b, "pair_ids": ids}) if as_json else
               f"queued {len(ids)} blind eval pairs: v{a} against {ref}; people label them in `odpo serve`, "
               "and the dashboard shows the human win rate")
