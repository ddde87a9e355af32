"""`odpo eval --a vN --b base|vM --judge SPEC`: win rate of one policy version over another."""
from __future__ import annotations

import json
import re
from typing import Any, Optional

import click

from odpo.app.cli.judge import SPEC_HELP, build_judge_options, judge_options
from odpo.app.config import CommonConfig
from odpo.db.errors import OdpoError

_VERSION_RE = re.compile(r"^v?(\d+)$")


class VersionSpecError(OdpoError):
    """A --a/--b value that names no version."""


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
    b = "base" if result.version_b == 0 else f"v{result.version_b}"
    return (f"v{result.version_a} vs {b}, judge {result.judge}: win rate {w.rate:.3f} "
            f"[{w.low:.3f}, {w.high:.3f}] (95% Wilson, ties count half), n={w.n}: {w.wins} wins, "
            f"{w.losses} losses, {w.ties} ties; {result.abstained} abstained (eval #{result.eval_id})")


@click.command("eval")
@click.option("--a", "version_a", default="latest", show_default=True, help="Policy A: vN, latest or base.")
@click.option("--b", "version_b", default="base", show_default=True, help="Policy B: base, vM or latest.")
@click.option("--judge", "spec", required=True, envvar="ODPO_JUDGE", metavar="SPEC", help=SPEC_HELP)
@click.option("--n", type=click.IntRange(1), default=64, show_default=True, help="Held-out prompts to compare on.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.7, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed for both policies.")
@click.option("--run", default="default", show_default=True, help="Training run name.")
@click.option("--model", "model_spec", default=None,
              help="Base model spec (default: the one the adapter was trained on).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--load-in-4bit", is_flag=True,
              help="Both policies on the base in 4-bit NF4, as a --load-in-4bit trainer trained them.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@judge_options
@click.pass_obj
def eval_cmd(cfg: CommonConfig, version_a: str, version_b: str, spec: str, n: int, max_new_tokens: int,
             temperature: float, top_p: float, seed: int, run: str, model_spec: Optional[str], device: str,
             dtype: str, load_in_4bit: bool, as_json: bool, **judge_kwargs: Any) -> None:
    """Sample both policies on the held-out prompts, judge every pair in both orders, and store the
    win rate of A over B with a 95% interval (ties count half) in the evals table."""
    from odpo.db import store
    from odpo.trainer.evaluate import adapter_path, load_eval_policy, run_eval
    from odpo.trainer.export import base_model_spec
    from odpo.trainer.generation import SamplingParams
    from odpo.trainer.judges import load_judge

    db = cfg.open_db()
    try:
        with db.sessions() as s:
            latest = store.latest_adapter(s, run=run)
        a = parse_version(version_a, latest=latest.version if latest else 0)
        b = parse_version(version_b, latest=latest.version if latest else 0)
        if a == b:
            raise VersionSpecError(f"--a and --b both name v{a}; pick two different policies"
                                   + ("" if latest else " (no adapter version is committed yet)"))
        holds = a or b
        path = adapter_path(db, version=holds, run=run, base_dir=cfg.data_dir)
        judge_impl = load_judge(spec, build_judge_options(cfg, **judge_kwargs))
        policy, tokenizer, autocast_dtype = load_eval_policy(
            model_spec=base_model_spec(path, model_spec), adapter_dir=path, cache_dir=cfg.model_cache_dir,
            device=device, dtype=dtype, load_in_4bit=load_in_4bit)
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
        result = run_eval(db, policy=policy, tokenizer=tokenizer, version_a=a, version_b=b, judge=judge_impl,
                          n=n, params=params, run=run, holds=holds, base_dir=cfg.data_dir,
                          autocast_dtype=autocast_dtype)
        judge_impl.close()
    finally:
        db.close()
    click.echo(json.dumps(result.summary()) if as_json else describe(result))
