"""The ledger's invariants, checked on a database and its adapter directories after a chaos soak.

Each check returns the offending items (empty = the invariant holds), so the soak reports a count
and a few examples per invariant. They read the rows directly (not through the store functions
the soak is testing), so a bug in a store function cannot hide itself.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from odpo.db.models import Adapter, Label, LabelUse, Pair, Sample, TrainStep

STALE_STEP = -1  # label_uses.step of a label skipped as too stale (never trained)
_VERSION_DIR = re.compile(r"^v(\d+)(\.tmp)?$")


def answered_twice(s: Session) -> list[Any]:
    """A labeler's live (not undone) votes on one pair: at most one (one assignment, one answer)."""
    stmt = (select(Label.pair_id, Label.labeler, func.count()).where(Label.undone.is_(False))
            .group_by(Label.pair_id, Label.labeler).having(func.count() > 1))
    return [tuple(r) for r in s.execute(stmt)]


def over_labeled(s: Session) -> list[Any]:
    """No pair holds more live labels than the labelers it asked for."""
    live = (select(Label.pair_id, func.count().label("n")).where(Label.undone.is_(False))
            .group_by(Label.pair_id).subquery())
    stmt = select(Pair.id, live.c.n, Pair.labels_wanted).join(live, live.c.pair_id == Pair.id) \
        .where(live.c.n > Pair.labels_wanted)
    return [tuple(r) for r in s.execute(stmt)]


def trained_twice(s: Session) -> list[Any]:
    """A label appears in at most one committed step of the live versions of a run."""
    seen: dict[tuple[str, int], int] = defaultdict(int)
    for run, ids in s.execute(_live_steps()):
        for label_id in ids or []:
            seen[(run, int(label_id))] += 1
    return [key for key, n in seen.items() if n > 1]


def consumed_by_dead_version(s: Session) -> list[Any]:
    """Every consumed label belongs to a committed, live (not rolled back) version of its run."""
    live = {(r, v) for r, v in s.execute(select(Adapter.run, Adapter.version).where(Adapter.rolled_back.is_(False)))}
    stmt = select(LabelUse.label_id, LabelUse.run, LabelUse.version).where(LabelUse.step != STALE_STEP)
    return [tuple(r) for r in s.execute(stmt) if (r.run, r.version) not in live]


def version_labels_mismatch(s: Session) -> list[Any]:
    """Each live version's ledger rows name exactly the label ids of its committed steps."""
    by_steps: dict[tuple[str, int], set[int]] = defaultdict(set)
    for run, version, ids in s.execute(select(TrainStep.run, TrainStep.version, TrainStep.label_ids)
                                       .where(TrainStep.committed.is_(True))):
        by_steps[(run, version)].update(int(i) for i in ids or [])
    by_ledger: dict[tuple[str, int], set[int]] = defaultdict(set)
    for label_id, run, version in s.execute(select(LabelUse.label_id, LabelUse.run, LabelUse.version)
                                            .where(LabelUse.step != STALE_STEP)):
        by_ledger[(run, version)].add(int(label_id))
    live = s.execute(select(Adapter.run, Adapter.version).where(Adapter.rolled_back.is_(False))).all()
    return [(run, v) for run, v in live if by_steps.get((run, v), set()) != by_ledger.get((run, v), set())]


def undone_trained(s: Session) -> list[Any]:
    """An undone vote is never in the ledger."""
    stmt = select(LabelUse.label_id, LabelUse.run).join(Label, Label.id == LabelUse.label_id) \
        .where(Label.undone.is_(True), LabelUse.step != STALE_STEP)
    return [tuple(r) for r in s.execute(stmt)]


def samples_without_token_ids(s: Session) -> list[Any]:
    """Every sample keeps the token ids it was drawn with (what the trainer scores)."""
    # In Python: a JSON column stores None as JSON null, which SQL's IS NULL does not match.
    stmt = select(Sample.id, Sample.prompt_token_ids, Sample.token_ids)
    return [sid for sid, prompt_ids, ids in s.execute(stmt) if not prompt_ids or ids is None]


def _live_steps():
    live = select(Adapter.run, Adapter.version).where(Adapter.rolled_back.is_(False)).subquery()
    return (select(TrainStep.run, TrainStep.label_ids).where(TrainStep.committed.is_(True))
            .join(live, (live.c.run == TrainStep.run) & (live.c.version == TrainStep.version)))


def adapter_rows_without_weights(s: Session, data_dir: Path) -> list[Any]:
    """Every adapters row has its directory with weights in it."""
    missing = []
    for run, version, path in s.execute(select(Adapter.run, Adapter.version, Adapter.path)):
        where = Path(path) if Path(path).is_absolute() else data_dir / path
        if not (where / "adapter_model.safetensors").is_file() or not (where / "adapter_config.json").is_file():
            missing.append((run, version, str(where)))
    return missing


def version_dirs_without_rows(s: Session, data_dir: Path) -> list[Any]:
    """No `v<N>/` or `v<N>.tmp/` on disk without an adapters row (checked after a trainer restart)."""
    rows = {(r, v) for r, v in s.execute(select(Adapter.run, Adapter.version))}
    orphans = []
    for adapters in sorted((data_dir / "runs").glob("*/adapters")):
        run = adapters.parent.name
        for child in adapters.iterdir():
            m = _VERSION_DIR.match(child.name)
            if m and (m.group(2) or (run, int(m.group(1))) not in rows):
                orphans.append(str(child))
    return orphans


DB_CHECKS: dict[str, Callable[[Session], list[Any]]] = {
    "assignment answered twice": answered_twice,
    "pair with more labels than it asked for": over_labeled,
    "label trained twice in one run": trained_twice,
    "consumed label outside a live version of its run": consumed_by_dead_version,
    "version's labels differ from its steps' label ids": version_labels_mismatch,
    "undone vote trained": undone_trained,
    "sample without the token ids it was drawn with": samples_without_token_ids,
}
DISK_CHECKS: dict[str, Callable[[Session, Path], list[Any]]] = {
    "adapters row without its directory and weights": adapter_rows_without_weights,
    "version directory without a row after restart": version_dirs_without_rows,
}


def check_all(s: Session, data_dir: Path) -> dict[str, dict[str, Any]]:
    """{invariant: {"violations": n, "examples": [...]}} for every invariant."""
    found = {name: fn(s) for name, fn in DB_CHECKS.items()}
    found.update({name: fn(s, data_dir) for name, fn in DISK_CHECKS.items()})
    return {name: {"violations": len(items), "examples": [str(i) for i in items[:5]]} for name, items in found.items()}
