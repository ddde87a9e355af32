"""Imported preference datasets, and the label reads of the iterative and offline training modes.

An imported row is stored in the live tables, so no schema change is needed and the export, the
ledger, rollbacks and train steps work on it unchanged: a prompt (reused when the same normalised
text is stored), two samples (a = chosen, b = rejected; no token ids, params say which file and row)
and a pair with ONE label choosing "a". What keeps it apart from the live loop:

- the pair has purpose "dataset" and status "labeled": no queue, judge or retirement picks it up;
- label source and labeler are "dataset:<name>": `source_filter("all")` leaves it out, so only
  `sources="dataset"` reads it (`odpo train --mode offline`, `odpo export dataset --source dataset`);
- the import claims its name with one insert on a unique key (the `control` row "dataset:<name>"),
  so two imports of one name cannot both land, on SQLite and PostgreSQL alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sqlalchemy import insert, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from odpo.db.errors import StoreError
from odpo.db.models import TRAINABLE_CHOICES, Control, Label, LabelUse, Pair, Prompt, Sample, utcnow
from odpo.db.store.adapters import STALE_STEP, TrainingLabel, _unused_in, not_excluded
from odpo.db.store.labels import source_filter
from odpo.db.store.prompts import conversation, prompt_hash
from odpo.db.vocabulary import DATASET_SOURCE_PREFIX

DATASET_PURPOSE = "dataset"
_CHUNK = 500  # rows per multi-row INSERT: under SQLite's and PostgreSQL's parameter limits


@dataclass(frozen=True)
class DatasetRow:
    """One preference of an imported file; `row` is its line (JSONL) or row (Parquet) number;
    `context` the earlier turns of a conversational prompt (`prompt` is its final user message)."""

    prompt: str
    chosen: str
    rejected: str
    row: int
    context: tuple[dict[str, str], ...] = ()

    @property
    def key(self) -> str:
        """The prompt's unique key (store.prompt_hash), earlier turns included."""
        return prompt_hash(self.prompt, self.context)


@dataclass(frozen=True)
class DatasetImport:
    name: str
    pairs: int
    prompts_added: int
    prompts_reused: int


def dataset_source(name: str) -> str:
    """The label source (and labeler) of dataset `name`."""
    return f"{DATASET_SOURCE_PREFIX}{name}"


def import_dataset_rows(session: Session, *, name: str, file: str, rows: Sequence[DatasetRow]) -> DatasetImport:
    """Store `rows` as dataset `name`, in the caller's single transaction (all or nothing).

    Refuses (StoreError) a name already imported: re-importing a file is refused, not doubled."""
    source = dataset_source(name)
    if not _claim_name(session, key=source, value={"file": file, "pairs": len(rows)}):
        raise StoreError(f"a dataset named {name!r} is already imported; nothing was imported "
                         "(give this import another --name)")
    prompt_ids, added = _prompt_ids(session, rows=rows, source=source)
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start:start + _CHUNK]
        samples = [{"prompt_id": prompt_ids[r.key], "adapter_version": 0, "text": text,
                    "tokens": 0, "finish_reason": "stop", "gen_seconds": 0.0,
                    "params": {"origin": "dataset", "file": file, "row": r.row}, "created_at": utcnow()}
                   for r in chunk for text in (r.chosen, r.rejected)]
        sample_ids = _insert_ids(session, Sample, samples)
        pairs = [{"prompt_id": samples[2 * i]["prompt_id"], "sample_a_id": sample_ids[2 * i],
                  "sample_b_id": sample_ids[2 * i + 1], "created_version": 0, "status": "labeled",
                  "labels_wanted": 1, "claims": 0, "purpose": DATASET_PURPOSE, "created_at": utcnow()}
                 for i in range(len(chunk))]
        pair_ids = _insert_ids(session, Pair, pairs)
        session.execute(insert(Label), [{"pair_id": pid, "choice": "a", "labeler": source, "source": source,
                                         "answered_at": utcnow(), "undone": False, "uses": 0}
                                        for pid in pair_ids])
    session.flush()
    distinct = len(set(prompt_ids))
    return DatasetImport(name=name, pairs=len(rows), prompts_added=added, prompts_reused=distinct - added)


def _claim_name(session: Session, *, key: str, value: dict[str, Any]) -> bool:
    """Insert the control row `key` unless it exists, in one statement; True if this call inserted it."""
    row = {"key": key, "value": dict(value, imported_at=utcnow().isoformat(timespec="seconds")),
           "updated_at": utcnow()}
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        stmt = (sqlite_insert if dialect == "sqlite" else postgresql_insert)(Control).values(**row)
        # RETURNING, not rowcount: psycopg reports -1 for an INSERT .. ON CONFLICT through the ORM session
        stmt = stmt.on_conflict_do_nothing(index_elements=[Control.key]).returning(Control.key)
        return session.execute(stmt).first() is not None
    try:
        with session.begin_nested():
            session.execute(insert(Control).values(**row))
    except IntegrityError:
        return False
    return True


def _prompt_ids(session: Session, *, rows: Sequence[DatasetRow], source: str) -> tuple[dict[str, int], int]:
    """prompt hash -> id for every row's prompt, inserting the ones not stored yet; and how many
    were new."""
    hashes = list(dict.fromkeys(r.key for r in rows))
    found: dict[str, int] = {}
    for start in range(0, len(hashes), _CHUNK):
        chunk = hashes[start:start + _CHUNK]
        found.update(session.execute(select(Prompt.text_hash, Prompt.id).where(Prompt.text_hash.in_(chunk))).all())
    first: dict[str, DatasetRow] = {}
    for r in rows:
        first.setdefault(r.key, r)
    new = [h for h in hashes if h not in found]
    for start in range(0, len(new), _CHUNK):
        chunk = new[start:start + _CHUNK]
        ids = _insert_ids(session, Prompt, [{"text": first[h].prompt.strip(), "text_hash": h, "source": source,
                                             "tags": ["dataset"], "held_out": False, "times_sampled": 0,
                                             "context": [dict(m) for m in first[h].context] or None,
                                             "created_at": utcnow()} for h in chunk])
        found.update(zip(chunk, ids, strict=True))
    return found, len(new)


def _insert_ids(session: Session, model: Any, values: list[dict[str, Any]]) -> list[int]:
    """A multi-row INSERT returning the new ids in the order of `values`."""
    if not values:
        return []
    stmt = insert(model).returning(model.id, sort_by_parameter_order=True)
    return list(session.scalars(stmt, values))


def imported_datasets(session: Session) -> dict[str, dict[str, Any]]:
    """name -> what its import recorded (file, pairs, imported_at)."""
    rows = session.execute(select(Control.key, Control.value)
                           .where(Control.key.startswith(DATASET_SOURCE_PREFIX, autoescape=True)))
    return {key[len(DATASET_SOURCE_PREFIX):]: dict(value or {}) for key, value in rows}


# --- the label reads of the training modes ------------------------------------------------------

def trainable_labels(session: Session, *, run: str, sources: str, unused: bool = True,
                     pair_version: Optional[int] = None, label_ids: Optional[Sequence[int]] = None,
                     max_label_id: Optional[int] = None, limit: Optional[int] = None,
                     exclude_labelers: Optional[Sequence[str]] = None) -> list[TrainingLabel]:
    """Live a/b labels from `sources`, oldest first, as `unconsumed_labels` reads them (a person's
    opinion on a pair overrides a judge's), narrowed for the modes: unused by `run` (or any, with
    unused=False), of pairs sampled at `pair_version` (an iterative round), among `label_ids`, or
    up to `max_label_id` (an offline job resuming); never human labels of `exclude_labelers`."""
    human = aliased(Label)
    human_exists = select(human.id).where(human.pair_id == Label.pair_id, human.source == "human",
                                          human.undone.is_(False), human.choice != "skip").exists()
    sa, sb = aliased(Sample), aliased(Sample)
    stmt = (select(Label.id, Label.pair_id, Label.choice, Label.source, Prompt.text, sa.text, sb.text,
                   Pair.created_version, Prompt.context)
            .join(Pair, Pair.id == Label.pair_id).join(Prompt, Prompt.id == Pair.prompt_id)
            .join(sa, sa.id == Pair.sample_a_id).join(sb, sb.id == Pair.sample_b_id)
            .where(Label.undone.is_(False), Label.choice.in_(TRAINABLE_CHOICES), source_filter(sources))
            .where((Label.source == "human") | ~human_exists, not_excluded(exclude_labelers)).order_by(Label.id))
    if unused:
        stmt = stmt.where(_unused_in(run))
    if pair_version is not None:
        stmt = stmt.where(Pair.created_version == pair_version)
    if max_label_id is not None:
        stmt = stmt.where(Label.id <= max_label_id)
    if limit is not None:
        stmt = stmt.limit(limit)
    out: list[TrainingLabel] = []
    wanted = None if label_ids is None else list(dict.fromkeys(label_ids))
    for start in range(0, 1 if wanted is None else len(wanted), _CHUNK):
        part = stmt if wanted is None else stmt.where(Label.id.in_(wanted[start:start + _CHUNK]))
        for lid, pid, choice, source, prompt, a_text, b_text, version, context in session.execute(part):
            chosen, rejected = (a_text, b_text) if choice == "a" else (b_text, a_text)
            # A conversation's label carries its whole context: batching re-tokenises imported rows
            # (they have no sampled ids) from this, so the earlier turns are trained on too.
            what = conversation(context, prompt) if context else prompt
            out.append(TrainingLabel(label_id=lid, pair_id=pid, prompt=what, chosen=chosen,
                                     rejected=rejected, pair_version=version, source=source))
    return sorted(out, key=lambda lb: lb.label_id)


def trained_since(session: Session, *, run: str, after_version: int, sources: str) -> list[int]:
    """Ids of the labels from `sources` that `run` trained (not skipped) into versions newer than
    `after_version`, oldest first: the part of an offline job its committed versions hold."""
    stmt = (select(LabelUse.label_id).join(Label, Label.id == LabelUse.label_id)
            .where(LabelUse.run == run, LabelUse.version > after_version, LabelUse.step != STALE_STEP,
                   source_filter(sources)).order_by(LabelUse.label_id))
    return list(session.scalars(stmt))


def used_by_run(session: Session, *, run: str, label_ids: Sequence[int]) -> set[int]:
    """Which of `label_ids` are in `run`'s ledger already (trained or skipped)."""
    ids = list(dict.fromkeys(label_ids))
    used: set[int] = set()
    for start in range(0, len(ids), _CHUNK):
        used.update(session.scalars(select(LabelUse.label_id).where(LabelUse.run == run,
                                                                    LabelUse.label_id.in_(ids[start:start + _CHUNK]))))
    return used
