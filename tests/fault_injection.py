"""Run the real odpo CLI with pauses injected at named moments, so a test can kill -9 it exactly there.

    python -m tests.fault_injection --pause commit=0.5 -- --data-dir D train ...

The product carries no test hooks: this module wraps odpo's own functions in the child process
(monkeypatching, before the CLI runs) with a wrapper that announces the moment on stderr, flushes,
sleeps, and goes on. The moments, and the function each one wraps:

    step    gradients computed and clipped, before optimizer.step   (train_step._clip, after it)
    save    v<N>.tmp written and fsynced, before the rename         (checkpoint.fsync_tree, after it)
    commit  v<N>/ renamed, before the DB commit                     (DPOTrainer._commit_row, before it)

Each announcement contains `announcement(moment)`, which is what tests/test_crash.py waits for.
A wrap point that no longer exists fails the child at once with one line naming it.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Moment:
    """Where to pause: `attr` (dotted below `module`), before or after the call, and what holds then."""

    module: str
    attr: str
    after: bool
    describe: Callable[[tuple[Any, ...], dict[str, Any]], str]


MOMENTS = {
    "step": Moment("odpo.trainer.training.step", "_clip", after=True,
                   describe=lambda args, kw: "gradients computed, before optimizer.step"),
    "save": Moment("odpo.trainer.policy.checkpoint", "fsync_tree", after=True,
                   describe=lambda args, kw: f"{getattr(args[0], 'name', args[0])} written, before the rename"),
    "commit": Moment("odpo.trainer.training.loop", "DPOTrainer._commit_row", after=False,
                     describe=lambda args, kw: f"v{kw.get('version')}/ renamed, before the DB commit"),
}


def announcement(moment: str) -> str:
    """The text every pause at `moment` prints (a test waits for it in the child's output)."""
    return f"fault injection {moment}:"


def _pause(moment: str, what: str, seconds: float) -> None:
    for handler in logging.getLogger().handlers:  # earlier log lines first, then ours
        handler.flush()
    print(f"{announcement(moment)} {what}; sleeping {seconds:.1f}s", file=sys.stderr, flush=True)
    time.sleep(seconds)


def _wrap(moment: str, spec: Moment, fn: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not spec.after:
            _pause(moment, spec.describe(args, kwargs), seconds)
        result = fn(*args, **kwargs)
        if spec.after:
            _pause(moment, spec.describe(args, kwargs), seconds)
        return result

    return wrapper


def install(pauses: dict[str, float]) -> None:
    """Replace each named moment's function by its pausing wrapper (in this process only)."""
    for moment, seconds in pauses.items():
        spec = MOMENTS[moment]
        owner: Any = importlib.import_module(spec.module)
        *path, name = spec.attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, name, None)
        if fn is None:
            raise SystemExit(f"fault injection: {spec.module}.{spec.attr} is gone; update tests/fault_injection.py")
        setattr(owner, name, _wrap(moment, spec, fn, seconds))


def _parse(argv: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """`--pause MOMENT=SECONDS ... -- CLI ARGS` -> ({moment: seconds}, CLI args)."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m tests.fault_injection")
    parser.add_argument("--pause", action="append", default=[], metavar="MOMENT=SECONDS",
                        help=f"pause at a moment: {', '.join(MOMENTS)}")
    opts = parser.parse_args(argv[:split])
    pauses = {}
    for item in opts.pause:
        moment, _, seconds = item.partition("=")
        if moment not in MOMENTS or not seconds:
            parser.error(f"--pause {item!r}: expected MOMENT=SECONDS with MOMENT one of {', '.join(MOMENTS)}")
        pauses[moment] = float(seconds)
    return pauses, argv[split + 1:]


def run(pauses: dict[str, float], cli_args: Sequence[str]) -> None:
    """Install the pauses, then run the normal CLI (`odpo.app.cli:main`) on `cli_args`."""
    install(pauses)
    from odpo.app.cli import main

    sys.argv = ["odpo", *cli_args]
    main()


if __name__ == "__main__":
    run(*_parse(sys.argv[1:]))
