"""`odpo bench chaos`: a judge-driven `odpo up` soaked in faults, then the ledger's invariants.

A driver SIGKILLs random children of `odpo up` (serve, train, judge) and `up` itself at random
moments, while simulated labelers vote, double-submit and undo over HTTP. `up` must restart its
children; a killed `up` must take them down with it (we restart it, as a service manager would).
At the end the trainer is restarted once (it clears leftover version directories on start) and
every invariant in bench/chaos_checks.py is checked on the database and the adapter directories.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from odpo.bench.chaos_checks import check_all
from odpo.bench.chaos_labelers import ChaosLabelers
from odpo.bench.common import BenchContext, BenchResult, Target
from odpo.bench.labeler_sim import ApiClient
from odpo.bench.workspace import Child, free_port, wait_http

log = logging.getLogger(__name__)

ROLES = ("serve", "train", "judge")
TARGETS = (Target("chaos: kills survived", "kills_survived", ">=", 20.0),
           Target("chaos: invariant violations", "violations", "<=", 0.0))
# minutes, seconds between kills (uniform range), labelers, max_new_tokens
# Gaps long enough for a killed serve to load the model and sample again on 2 CPU cores, so labels
# are made and trained between kills (a soak that only ever kills starting processes proves nothing).
SIZES = {"quick": (9.0, (15.0, 25.0), 2, 24), "full": (30.0, (15.0, 45.0), 4, 48)}
WEIGHTS = {"serve": 3, "train": 3, "judge": 3, "up": 1}
START_TIMEOUT_S = 600.0
RECOVER_S = 180.0
DEFAULT_RULE = "rule:say_the_early"


@dataclass
class Kill:
    target: str
    pid: int
    at: float
    recovered_at: Optional[float] = None


@dataclass
class Soak:
    """The `odpo up` under test: (re)starts it and finds the pid of each of its children by role."""

    ctx: BenchContext
    cfg: Any
    args: list
    port: int
    up: Optional[Child] = None
    up_starts: int = 0
    orphans: list = field(default_factory=list)

    def start(self) -> None:
        self.up = Child.start(self.cfg, self.args, log_path=self.cfg.data_dir.parent / f"up-{self.up_starts}.log",
                              threads=self.ctx.threads)
        self.up_starts += 1

    def children(self) -> dict[str, int]:
        """{role: pid} of the live children of the current `up`."""
        import psutil

        if self.up is None or not self.up.alive():
            return {}
        found: dict[str, int] = {}
        try:
            for proc in psutil.Process(self.up.proc.pid).children():
                role = next((a for a in proc.cmdline() if a in ROLES), None)
                if role:
                    found[role] = proc.pid
        except psutil.Error:
            pass
        return found

    def kill_up(self) -> int:
        """SIGKILL `up` alone (not its group): its children must follow by themselves."""
        import psutil

        assert self.up is not None
        pid, kids = self.up.proc.pid, list(self.children().values())
        self.up.proc.kill()
        self.up.proc.wait()
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and any(psutil.pid_exists(k) and _running(k) for k in kids):
            time.sleep(0.2)
        left = [k for k in kids if psutil.pid_exists(k) and _running(k)]
        self.orphans.extend(left)
        for k in left:  # leaked: count them, then clean up so the soak can go on
            _kill(k)
        self.up.stop(grace_s=1.0)
        self.start()
        return pid


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill(pid: int) -> None:
    import os
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def run(ctx: BenchContext, *, minutes: Optional[float] = None, labelers: Optional[int] = None,
        rule: str = DEFAULT_RULE) -> BenchResult:
    size = SIZES["quick" if ctx.quick else "full"]
    minutes, gap, n_labelers, tokens = minutes or size[0], size[1], labelers or size[2], size[3]
    seed = ctx.seed
    rng = random.Random(seed)
    result = BenchResult(bench="chaos", quick=ctx.quick,
                         params={"model": ctx.model, "minutes": minutes, "kill_gap_s": list(gap),
                                 "labelers": n_labelers, "rule": rule, "max_new_tokens": tokens, "seed": seed,
                                 "app": "odpo up --judge RULE --auto-label, SIGKILLs to serve/train/judge/up"})
    with ctx.scratch("chaos") as cfg:
        port = free_port()
        soak = Soak(ctx=ctx, cfg=cfg, port=port, args=_up_args(ctx, port, rule, tokens))
        soak.start()
        url = f"http://127.0.0.1:{port}/"
        startup = wait_http(url, timeout_s=START_TIMEOUT_S, child=soak.up)
        startup += _wait_for_pairs(url, soak)  # kills start once pairs flow
        crowd = ChaosLabelers(url, n=n_labelers, seed=seed)
        crowd.start()
        try:
            kills = _kill_loop(soak, rng, deadline=time.monotonic() + minutes * 60.0, gap=gap)
        finally:
            crowd.stop()
            assert soak.up is not None
            soak.up.stop(grace_s=30.0)
        restart_code = _restart_trainer(ctx, cfg, rule)
        db = cfg.open_db()
        try:
            with db.sessions() as s:
                invariants = check_all(s, cfg.data_dir)
                facts = _facts(s)
        finally:
            db.close()
    _fill(result, kills=kills, soak=soak, crowd=crowd, invariants=invariants, facts=facts,
          startup=startup, restart_code=restart_code)
    result.check(TARGETS)
    return result


def _up_args(ctx: BenchContext, port: int, rule: str, tokens: int) -> list[str]:
    return ["up", "--port", str(port), "--model", ctx.model, "--device", ctx.device, "--dtype", ctx.dtype,
            "--seed", str(ctx.seed), "--queue-size", "8", "--prompts-per-batch", "4", "--max-new-tokens", str(tokens),
            "--judge", rule, "--auto-label", "--batch-size", "4", "--grace", "10", "--max-restarts", "1000",
            "--restart-delay", "1", "--claim-timeout", "20",
            "--train-args", f"--max-completion-tokens {tokens} --poll-seconds 0.5"]


def _kill_loop(soak: Soak, rng: random.Random, *, deadline: float, gap: tuple[float, float]) -> list[Kill]:
    """Kill something every `gap` seconds; a kill is survived when its role runs again (new pid)."""
    kills: list[Kill] = []
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(*gap))
        _note_recoveries(soak, kills)
        live = soak.children()
        if len(live) < len(ROLES):
            continue  # still (re)starting: let it come up before the next kill
        target = rng.choices([*WEIGHTS], weights=list(WEIGHTS.values()))[0]
        if target == "up":
            kills.append(Kill("up", soak.kill_up(), time.monotonic()))
        else:
            _kill(live[target])
            kills.append(Kill(target, live[target], time.monotonic()))
        log.info("chaos: killed %s (pid %d); %d kills so far", target, kills[-1].pid, len(kills))
    wait_until = time.monotonic() + RECOVER_S
    while time.monotonic() < wait_until and any(k.recovered_at is None for k in kills):
        _note_recoveries(soak, kills)
        time.sleep(1.0)
    return kills


def _note_recoveries(soak: Soak, kills: list[Kill]) -> None:
    """A kill is survived once its role runs again under a new pid (all three after an `up` kill)
    and, where serve was hit, the web app answers again."""
    live = soak.children()
    serving = None
    for k in kills:
        if k.recovered_at is not None:
            continue
        back = live.get(k.target, k.pid) != k.pid if k.target != "up" else \
            soak.up is not None and soak.up.alive() and len(live) == len(ROLES)
        if back and k.target in ("serve", "up"):
            serving = _answers(soak.port) if serving is None else serving
            back = serving
        if back:
            k.recovered_at = time.monotonic()


def _wait_for_pairs(url: str, soak: Soak) -> float:
    """Seconds until the first pair is queued or labeled (the judge may label each one at once)."""
    client, started = ApiClient(url), time.monotonic()
    try:
        while time.monotonic() - started < START_TIMEOUT_S:
            if soak.up is None or not soak.up.alive():
                raise RuntimeError(f"odpo up exited before the first pair:\n{soak.up.tail() if soak.up else ''}")
            counters = client.predict(api_name="/counters")
            if counters["queue"] or counters["unconsumed"]:
                return time.monotonic() - started
            time.sleep(1.0)
    finally:
        client.close()
    raise RuntimeError(f"no pair in {START_TIMEOUT_S:.0f}s")


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _restart_trainer(ctx: BenchContext, cfg: Any, rule: str) -> Optional[int]:
    """One trainer start after the soak: it clears version directories no row names on start, then
    trains at most one step and stops."""
    import subprocess

    from odpo.bench.workspace import child_env, odpo_command

    cmd = odpo_command(cfg, ["train", "--model", ctx.model, "--device", ctx.device, "--dtype", ctx.dtype,
                             "--batch-size", "4", "--max-steps", "1", "--exit-when-idle", "0"])
    try:
        return subprocess.run(cmd, capture_output=True, timeout=600, env=child_env(cfg)).returncode
    except subprocess.TimeoutExpired:
        return None


def _facts(s: Any) -> dict[str, Any]:
    from sqlalchemy import func, select

    from odpo.db.models import Adapter, Label, LabelUse

    count = lambda stmt: int(s.execute(stmt).scalar() or 0)  # noqa: E731
    return {"labels": count(select(func.count()).select_from(Label)),
            "labels_undone": count(select(func.count()).select_from(Label).where(Label.undone.is_(True))),
            "labels_trained": count(select(func.count()).select_from(LabelUse).where(LabelUse.step >= 0)),
            "versions": count(select(func.count()).select_from(Adapter)),
            "versions_rolled_back": count(select(func.count()).select_from(Adapter)
                                          .where(Adapter.rolled_back.is_(True)))}


def _fill(result: BenchResult, *, kills: list[Kill], soak: Soak, crowd: ChaosLabelers,
          invariants: dict[str, dict[str, Any]], facts: dict[str, Any], startup: float,
          restart_code: Optional[int]) -> None:
    survived = [k for k in kills if k.recovered_at is not None]
    by_target = {t: sum(1 for k in kills if k.target == t) for t in (*ROLES, "up")}
    recover = sorted(k.recovered_at - k.at for k in survived)
    violations = sum(v["violations"] for v in invariants.values())
    result.metrics.update(kills=len(kills), kills_survived=len(survived), kills_by_target=by_target,
                          recovery_s_max=recover[-1] if recover else None, up_starts=soak.up_starts,
                          orphans_after_up_killed=len(soak.orphans), violations=violations, invariants=invariants,
                          labelers=crowd.totals(), startup_seconds=startup, final_trainer_exit=restart_code, **facts)
    result.row("kills (serve / train / judge / up)", f"{len(kills)} ({by_target['serve']} / {by_target['train']} / "
               f"{by_target['judge']} / {by_target['up']}), survived {len(survived)}")
    result.row("children left running by a SIGKILLed up", len(soak.orphans))
    totals = crowd.totals()
    result.row("labeler votes / undos", f"{totals['votes']} / {totals['undos']}")
    result.row("double submits / second vote refused / both counted", f"{totals['double_submits']} / "
               f"{totals['double_refused']} / {totals['double_both_accepted']}")
    result.row("labels / trained / versions (rolled back)", f"{facts['labels']} / {facts['labels_trained']} / "
               f"{facts['versions']} ({facts['versions_rolled_back']})")
    for name, found in invariants.items():
        result.row(f"invariant: {name}", found["violations"])
