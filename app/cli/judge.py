"""`odpo judge --judge SPEC`: label pairs with a judge, alongside (never instead of) people.

Also home of the judge options shared with `odpo eval` (`judge_options`, `build_judge_options`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import click

from odpo.app.config import CommonConfig

SPEC_HELP = ("Judge spec: rule:<name> (shorter, longer, contains:<word>, avoid:<word>, regex:<pattern>, "
             "length:<n>, random), py:module:function, hf:<model>, openai:<model>@<base_url>, rm:<model>.")


def judge_options(fn: Callable) -> Callable:
    """The judge tuning flags `odpo judge` and `odpo eval` share."""
    decorators = [
        click.option("--template", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="Judge prompt file with {prompt}, {response_a}, {response_b} (hf:/openai:)."),
        click.option("--judge-device", default="auto", show_default=True, help="Device of hf:/rm: judges."),
        click.option("--judge-load-in-4bit", is_flag=True, help="Load an hf: judge's model in 4-bit NF4 (QLoRA)."),
        click.option("--abstain-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
                     help="LM judges abstain when the two orders disagree by more than this."),
        click.option("--tie-margin", type=click.FloatRange(0, 0.5, max_open=True), default=0.05,
                     show_default=True, help="|P(a better) - 0.5| below this is a tie."),
        click.option("--judge-timeout", type=click.FloatRange(0, min_open=True), default=60.0,
                     show_default=True, help="Seconds per HTTP request (openai:) or per py: call (a call "
                                             "that takes longer fails that pair and is abandoned)."),
        click.option("--judge-retries", type=click.IntRange(0), default=3, show_default=True,
                     help="Retries with backoff for an HTTP judge."),
    ]
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def build_judge_options(cfg: CommonConfig, *, template: Optional[Path], judge_device: str,
                        abstain_threshold: float, tie_margin: float, judge_timeout: float,
                        judge_retries: int, batch_size: int = 8, judge_load_in_4bit: bool = False) -> Any:
    from odpo.trainer.judges import JudgeOptions

    return JudgeOptions(template=template, cache_dir=cfg.model_cache_dir, device=judge_device,
                        load_in_4bit=judge_load_in_4bit,
                        abstain_threshold=abstain_threshold, tie_margin=tie_margin, timeout_s=judge_timeout,
                        retries=judge_retries, batch_size=batch_size)


@click.command()
@click.option("--judge", "spec", required=True, envvar="ODPO_JUDGE", metavar="SPEC", help=SPEC_HELP)
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Label only this share of queued pairs (stable by pair id); the rest stay for people.")
@click.option("--only-skipped", is_flag=True, help="Instead of queued pairs, label only pairs people skipped.")
@click.option("--shadow", is_flag=True,
              help="Instead of queued pairs, label pairs people already labeled: human-judge agreement "
                   "statistics (a person's label always wins in training).")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--poll-seconds", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Wait between looks at an empty queue.")
@click.option("--max-labels", type=click.IntRange(1), default=None, help="Stop after this many labels.")
@click.option("--exit-when-idle", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="Stop when no pair came for this long (for scripts).")
@judge_options
@click.pass_obj
def judge(cfg: CommonConfig, spec: str, fraction: float, only_skipped: bool, shadow: bool, batch_size: int,
          poll_seconds: float, max_labels: Optional[int], exit_when_idle: Optional[float],
          **judge_kwargs: Any) -> None:
    """Label pairs with a judge as labeler "judge:SPEC" (runs until Ctrl-C unless told otherwise).

    An abstaining judge hands the pair back to people at once; pairs are claimed through the same
    queue people use, so nobody labels a pair twice.
    """
    from odpo.trainer.judges import load_judge
    from odpo.trainer.judges.worker import JudgeWorkerConfig, run_judge_worker

    config = JudgeWorkerConfig(fraction=fraction, only_skipped=only_skipped, shadow=shadow,
                               batch_size=batch_size, poll_seconds=poll_seconds, max_labels=max_labels,
                               exit_when_idle=exit_when_idle)
    options = build_judge_options(cfg, batch_size=batch_size, **judge_kwargs)
    db = cfg.open_db()
    judge_impl = load_judge(spec, options)
    try:
        stats = run_judge_worker(db, judge_impl, config=config)
    except KeyboardInterrupt:
        click.echo("judge stopped", err=True)
        return
    finally:
        judge_impl.close()
        db.close()
    click.echo(json.dumps({"judge": judge_impl.spec, "mode": config.mode, **stats.as_dict()}))
