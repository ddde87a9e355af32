"""The chaos soak's invariant checks find each kind of violation, and none on an honest ledger."""
from __future__ import annotations

from pathlib import Path

from odpo.bench.chaos_checks import check_all
from odpo.db.models import Adapter, Label, LabelUse, Sample, TrainStep
from tests.db_helpers import label_all, make_pairs


def _violations(database, data_dir: Path) -> dict[str, int]:
    with database.sessions() as s:
        return {name: found["violations"] for name, found in check_all(s, data_dir).items()}


def _commit_version(s, data_dir: Path, *, run: str, version: int, label_ids: list[int]) -> None:
    path = data_dir / "runs" / run / "adapters" / f"v{version}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x")
    (path / "adapter_config.json").write_text("{}")
    s.add(Adapter(run=run, version=version, path=str(path), parent=version - 1, step=version))
    s.add(TrainStep(run=run, step=version, version=version, label_ids=label_ids, loss=0.5, committed=True))
    for label_id in label_ids:
        s.add(LabelUse(label_id=label_id, run=run, version=version, step=version))


def _with_token_ids(database) -> None:
    with database.sessions.begin() as s:
        for sample in s.query(Sample):
            sample.prompt_token_ids, sample.token_ids = [1, 2], [3, 4]


def test_an_honest_ledger_has_no_violations(database, tmp_path):
    make_pairs(database, 4)
    _with_token_ids(database)
    labels = label_all(database, "ann")
    with database.sessions.begin() as s:
        _commit_version(s, tmp_path, run="default", version=1, label_ids=labels[:2])
        _commit_version(s, tmp_path, run="other", version=1, label_ids=labels[:2])  # two runs may share labels
    assert set(_violations(database, tmp_path).values()) == {0}


def test_each_violation_is_found(database, tmp_path):
    make_pairs(database, 4)
    labels = label_all(database, "ann")
    with database.sessions.begin() as s:
        first = s.get(Label, labels[0])
        s.add(Label(pair_id=first.pair_id, choice="b", labeler="ann"))  # a second live answer
        s.get(Label, labels[1]).undone = True
        _commit_version(s, tmp_path, run="default", version=1, label_ids=labels[:2])  # trains the undone one
        s.add(TrainStep(run="default", step=9, version=1, label_ids=[labels[0]], loss=0.1, committed=True))
        s.add(Adapter(run="default", version=2, path=str(tmp_path / "missing"), parent=1, step=2))
        s.add(LabelUse(label_id=labels[2], run="default", version=7, step=7))  # no such version
        s.add(LabelUse(label_id=labels[3], run="default", version=1, step=1))  # in v1's ledger, in no v1 step
    (tmp_path / "runs" / "default" / "adapters" / "v3.tmp").mkdir()
    found = _violations(database, tmp_path)
    assert found["assignment answered twice"] == 1
    assert found["pair with more labels than it asked for"] == 1
    assert found["undone vote trained"] == 1
    assert found["label trained twice in one run"] == 1
    assert found["consumed label outside a live version of its run"] == 1
    assert found["version's labels differ from its steps' label ids"] == 1
    assert found["adapters row without its directory and weights"] == 1
    assert found["version directory without a row after restart"] == 1
    assert found["sample without the token ids it was drawn with"] == 8
