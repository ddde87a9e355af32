"""`odpo import dataset` (issue 12, modes): TRL preference formats in, nothing half-imported,
`odpo export dataset` round-trips, and nothing of the live loop picks imported pairs or labels up."""
from __future__ import annotations

import datetime as dt
import json
import sys

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from odpo.app.services.dataset_import import DatasetFileError, import_dataset
from odpo.db import store
from odpo.db.engine import Database
from odpo.db.models import Label, Pair, Prompt, Sample
from odpo.trainer.export.exporters import export_dataset
from tests.db_helpers import label_all, make_pairs

PLAIN = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I like trains."},
         {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Goodbye forever."}]
CONVERSATIONAL = [
    {"prompt": [{"role": "user", "content": "Count to two."}],
     "chosen": [{"role": "assistant", "content": "One, two."}],
     "rejected": [{"role": "assistant", "content": "Seven."}]},
    {"chosen": [{"role": "user", "content": "Is water wet?"}, {"role": "assistant", "content": "Yes."}],
     "rejected": [{"role": "user", "content": "Is water wet?"}, {"role": "assistant", "content": "Purple."}]},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def triples(rows) -> list[tuple]:
    """(prompt, chosen, rejected) texts of exported rows (TRL conversational format)."""
    return [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def counts(database) -> tuple[int, int, int, int]:
    with database.sessions() as s:
        return tuple(s.scalar(select(func.count()).select_from(m)) for m in (Prompt, Sample, Pair, Label))


def test_plain_and_conversational_jsonl_import_with_provenance(database, tmp_path):
    report = import_dataset(database, path=write_jsonl(tmp_path / "prefs.jsonl", PLAIN + CONVERSATIONAL))
    assert (report.name, report.pairs, report.prompts_added) == ("prefs", 4, 4)
    out = tmp_path / "again.jsonl"
    export_dataset(database, out=out, sources="dataset")
    assert triples(read_jsonl(out)) == [("Name a colour.", "Blue.", "I like trains."),
                                        ("Say hi.", "Hi!", "Goodbye forever."),
                                        ("Count to two.", "One, two.", "Seven."),
                                        ("Is water wet?", "Yes.", "Purple.")]
    with database.sessions() as s:
        pairs = list(s.scalars(select(Pair)))
        labels = list(s.scalars(select(Label)))
        sample = s.get(Sample, pairs[2].sample_a_id)
        prompt = s.get(Prompt, pairs[0].prompt_id)
    assert {(p.purpose, p.status, p.created_version) for p in pairs} == {("dataset", "labeled", 0)}
    assert {(lb.source, lb.labeler, lb.choice) for lb in labels} == {("dataset:prefs", "dataset:prefs", "a")}
    assert sample.params == {"origin": "dataset", "file": "prefs.jsonl", "row": 3}
    assert sample.token_ids is None and sample.prompt_token_ids is None
    assert prompt.source == "dataset:prefs" and not prompt.held_out


def test_live_loop_leaves_imported_pairs_and_labels_alone(database, tmp_path):
    import_dataset(database, path=write_jsonl(tmp_path / "d.jsonl", PLAIN))
    with database.sessions.begin() as s:
        assert store.claim_next_pair(s, labeler="ann") is None  # not in the labeling queue
        assert store.judge_candidates(s, labeler="judge:x", mode="shadow", limit=10) == []
        assert store.judge_candidates(s, labeler="judge:x", mode="skipped", limit=10) == []
        assert store.unconsumed_labels(s, limit=10) == [] and store.count_unconsumed(s) == 0
        assert len(store.unconsumed_labels(s, limit=10, sources="dataset")) == 2
        assert store.labels_per_hour(s, since=dt.datetime(2000, 1, 1)) == []
        assert store.retire_queue(s) == 0 and store.count_pairs(s, status="queued") == 0
        assert store.status_counts(s)["unconsumed_trainable"] == 0
    with pytest.raises(Exception, match="no labeled a/b pairs"):
        export_dataset(database, out=tmp_path / "live.jsonl")  # `all` = people and judges


def test_export_round_trips_through_import(database, tmp_path, db_url):
    make_pairs(database, 3)
    label_all(database, "alice", "b")
    first = tmp_path / "export.jsonl"
    export_dataset(database, out=first)
    fresh = Database(f"sqlite:///{tmp_path / 'fresh.sqlite3'}")
    try:
        import_dataset(fresh, path=first, name="warm")
        again = tmp_path / "again.jsonl"
        export_dataset(fresh, out=again, sources="dataset")
        pq_out = tmp_path / "again.parquet"
        export_dataset(fresh, out=pq_out, sources="dataset")
        import_dataset(fresh, path=pq_out, name="warm2")  # the Parquet export imports too
        assert counts(fresh)[2] == 6 and counts(fresh)[0] == 3  # the prompts were reused
    finally:
        fresh.close()
    assert triples(read_jsonl(again)) == triples(read_jsonl(first))
    assert {r["source"] for r in read_jsonl(again)} == {"dataset:warm"}


def test_parquet_import_and_one_line_without_pyarrow(database, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(PLAIN), path)
    assert import_dataset(database, path=path).pairs == 2
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    with pytest.raises(DatasetFileError, match=r"prefs.parquet: reading Parquet needs pyarrow; install it"):
        import_dataset(database, path=path, name="other")


def test_bad_rows_one_line_each_and_nothing_imported(database, tmp_path):
    make_pairs(database, 1)
    before = counts(database)
    bad = [PLAIN[0], "{not json", {"prompt": "x", "chosen": "y"},
           {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
           PLAIN[1]]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DatasetFileError, match="3 bad row") as err:
        import_dataset(database, path=path)
    assert err.value.problems == [
        "bad.jsonl:2: malformed JSON: Expecting property name enclosed in double quotes (column 2)",
        "bad.jsonl:3: missing 'rejected'",
        "bad.jsonl:4: 'prompt': a conversation must end with a user message, got roles ['user', 'assistant']"]
    assert counts(database) == before
    report = import_dataset(database, path=path, skip_bad=True)
    assert report.pairs == 2 and len(report.bad_rows) == 3


def test_reimport_is_refused_in_one_line(database, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", PLAIN)
    import_dataset(database, path=path)
    before = counts(database)
    with pytest.raises(store.StoreError, match="a dataset named 'd' is already imported; nothing was imported"):
        import_dataset(database, path=path)
    assert counts(database) == before
    assert import_dataset(database, path=path, name="d2").prompts_reused == 2


def test_cli_import_dataset(common_config, tmp_path):
    from odpo.app.cli import cli

    base = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "import", "dataset"]
    good = write_jsonl(tmp_path / "good.jsonl", PLAIN)
    result = CliRunner().invoke(cli, base + [good, "--name", "g"])
    assert result.exit_code == 0, result.output
    assert "imported 2 preference pairs from good.jsonl as dataset 'g'" in result.output
    bad = write_jsonl(tmp_path / "bad.jsonl", [PLAIN[0], {"prompt": 3, "chosen": "a", "rejected": "b"}])
    result = CliRunner().invoke(cli, base + [bad])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "bad.jsonl:2: 'prompt' must be a string or a list of messages, got int" in result.output
    assert "Error: bad.jsonl: 1 bad row(s); nothing was imported" in result.output
    again = CliRunner().invoke(cli, base + [good, "--name", "g"])
    assert again.exit_code != 0 and "already imported" in again.output and "Traceback" not in again.output
    missing = CliRunner().invoke(cli, base + [str(tmp_path / "nope.jsonl")])
    assert missing.exit_code != 0 and "no such file" in missing.output and "Traceback" not in missing.output
