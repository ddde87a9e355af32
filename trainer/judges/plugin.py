"""`py:package.module:function` judges: bring your own preference function.

The function is called as ``function(prompt, response_a, response_b)`` and returns one of
  - a choice string: "a", "b", "tie", "both_bad" or "abstain" (case-insensitive);
  - a number in [0, 1]: the probability that response a is better;
  - a (choice, confidence) tuple, or a trainer.judges.Verdict.
A plugin that raises, returns anything else, or takes longer than `timeout_s` (`--judge-timeout`)
on one pair costs only that pair (it becomes a failed abstention with the reason attached, logged
once per kind); a plugin that fails on `max_consecutive_errors` pairs in a row is broken, and the
judge stops with a PluginError.

Timeouts: each call runs in a daemon thread and the judge waits for it at most `timeout_s`. A
Python thread cannot be killed, so a hung call is abandoned, not stopped: it keeps its thread
until it returns or the process exits (daemon threads do not hold up the exit). A subprocess per
plugin could be killed, but would lose what users rely on (module state such as a loaded model or
a client, no pickling of inputs, microseconds per call); abandoning is bounded instead: when
`MAX_HUNG_CALLS` abandoned calls are still running, the judge stops with a PluginError and the
process exit (`odpo judge`, restarted by `odpo up`) reclaims them.
Set ``function.order_free = True`` when the function ignores which response comes first; then
evaluation does not ask it twice.
"""
from __future__ import annotations

import importlib
import logging
import math
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from odpo.trainer.judges import JudgeError, JudgeOptions, Verdict, abstain, check_batch

log = logging.getLogger(__name__)

MAX_HUNG_CALLS = 3  # abandoned calls still running before the judge gives up on the plugin

_ALIASES = {"a": "a", "b": "b", "tie": "tie", "both_bad": "both_bad", "both bad": "both_bad",
            "both-bad": "both_bad", "abstain": "abstain"}


class PluginError(JudgeError):
    """A plugin that cannot be imported, is not callable, or keeps failing."""


def import_function(path: str) -> Callable[..., Any]:
    """'package.module:function' -> the callable, importing from the working directory too (where
    a user keeps their rules file)."""
    module_name, sep, attr = path.rpartition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"plugin {path!r} must look like package.module:function")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's, reported in one line
        hint = _moved_hint(module_name, attr) if isinstance(exc, ModuleNotFoundError) else ""
        raise PluginError(f"cannot import plugin module {module_name!r}: {type(exc).__name__}: {exc}{hint}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise PluginError(f"plugin module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise PluginError(f"plugin {path!r} is not callable")
    return fn


# Import names odpo had before everything moved under `odpo.` (a user's own `app` module is
# imported first, so these hints only show when nothing of that name exists any more).
_OLD_TOP_LEVEL = ("app", "trainer", "db")
# The bench's labeler rules became built-in rule judges (trainer/judges/rule.py).
_MOVED_SPECS = {"app.bench.rules": "rule:{attr}", "odpo.app.bench.rules": "rule:{attr}"}


def _moved_hint(module_name: str, attr: str) -> str:
    """'; odpo's modules moved: use ...' for a spec written against odpo's old top-level names."""
    if module_name in _MOVED_SPECS:
        return f" (odpo's modules moved: use {_MOVED_SPECS[module_name].format(attr=attr)})"
    top = module_name.split(".", 1)[0]
    if top in _OLD_TOP_LEVEL:
        return f" (odpo's modules moved: use py:odpo.{module_name}:{attr})"
    return ""


def to_verdict(value: Any, *, tie_margin: float) -> Optional[Verdict]:
    """A plugin's return value as a Verdict, or None when it is not one of the documented forms."""
    if isinstance(value, Verdict):
        return value
    if isinstance(value, str):
        choice = _ALIASES.get(value.strip().lower())
        return None if choice is None else Verdict(choice, confidence=0.0 if choice == "abstain" else 1.0)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and _is_prob(value[1]):
        choice = _ALIASES.get(value[0].strip().lower())
        return None if choice is None else Verdict(choice, confidence=float(value[1]))
    if _is_prob(value):
        p = float(value)
        if abs(p - 0.5) < tie_margin:
            return Verdict("tie", confidence=1.0 - 2.0 * abs(p - 0.5), p_a=p)
        return Verdict("a" if p > 0.5 else "b", confidence=max(p, 1.0 - p), p_a=p)
    return None


def _is_prob(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0.0 <= value <= 1.0)


class PluginJudge:
    """Calls a user function per pair, containing its failures."""

    def __init__(self, fn: Callable[..., Any], *, spec: str, options: Optional[JudgeOptions] = None) -> None:
        self.fn = fn
        self.spec = spec
        self.options = options or JudgeOptions()
        self.order_free = bool(getattr(fn, "order_free", False))
        self.consecutive_errors = 0
        self.last_error = ""
        self._hung: list[_Call] = []

    @classmethod
    def from_path(cls, path: str, *, spec: str, options: JudgeOptions) -> "PluginJudge":
        return cls(import_function(path), spec=spec, options=options)

    def judge(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, responses_a, responses_b)
        return [self._one(p, a, b) for p, a, b in zip(prompts, responses_a, responses_b, strict=True)]

    def _one(self, prompt: str, a: str, b: str) -> Verdict:
        call = _Call(self.fn, (prompt, a, b))
        if not call.done.wait(self.options.timeout_s):
            self._hung = [c for c in self._hung if not c.done.is_set()] + [call]
            verdict = self._failed(f"plugin call took longer than {self.options.timeout_s:g}s (--judge-timeout); "
                                   "abandoned")
            if len(self._hung) >= MAX_HUNG_CALLS:
                raise PluginError(f"judge {self.spec}: {len(self._hung)} calls still running after "
                                  f"--judge-timeout {self.options.timeout_s:g}s; stopping (a hung Python call "
                                  "cannot be cancelled: fix the plugin or raise --judge-timeout)")
            return verdict
        if call.error is not None:
            if not isinstance(call.error, Exception):
                raise call.error  # SystemExit / KeyboardInterrupt from the plugin: as if called directly
            return self._failed(f"plugin raised {type(call.error).__name__}: {call.error}")
        value = call.value
        verdict = to_verdict(value, tie_margin=self.options.tie_margin)
        if verdict is None:
            return self._failed(f"plugin returned {value!r:.80}; expected a/b/tie/both_bad/abstain "
                                "or a probability in [0, 1]")
        self.consecutive_errors = 0
        return verdict

    def _failed(self, reason: str) -> Verdict:
        self.consecutive_errors += 1
        if reason != self.last_error:
            log.warning("judge %s: %s (the pair is abstained)", self.spec, reason)
        self.last_error = reason
        if self.consecutive_errors >= self.options.max_consecutive_errors:
            raise PluginError(f"judge {self.spec} failed on {self.consecutive_errors} pairs in a row; "
                              f"last: {reason}")
        return abstain(reason, failed=True)

    def close(self) -> None:
        """Nothing to release."""


class _Call:
    """One plugin call in its own daemon thread, so that the judge can stop waiting for it."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None
        threading.Thread(target=self._run, args=(fn, args), name="odpo-py-judge", daemon=True).start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self.value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the judge's thread, which decides
            self.error = exc
        finally:
            self.done.set()
