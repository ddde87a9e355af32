"""Labeler quality: agreement with people, judges and gold answers; gold marking; the trainer
leaving out people below --min-labeler-agreement; guidelines an admin edits."""
from __future__ import annotations

import logging

import pytest
from sqlalchemy import update

from odpo.app.config import ServeConfig
from odpo.app.services.accounts import load_auth
from odpo.app.services.admin import MAX_GUIDELINES_CHARS, AdminError, AdminService, NotAdminError
from odpo.app.services.label_text import DEFAULT_GUIDELINES
from odpo.app.services.labeler_quality import labeler_quality
from odpo.app.services.labeling import LabelService
from odpo.app.ui.dashboard import labeler_quality_table
from odpo.app.ui.label import guidelines_text
from odpo.db import store
from odpo.db.models import Label
from odpo.trainer.training.loop import DPOTrainer
from odpo.trainer.training.train_config import TrainConfig, TrainConfigError
from tests.db_helpers import label_all, make_pairs
from tests.ui_fixtures import write_users

JUDGE = "judge:rule:x"
# Hand-built labels, pair by pair (p1..p5); tie/skip/both_bad are never compared.
HUMAN = {1: {"ann": "a", "bob": "a", "cat": "b"},
         2: {"ann": "b", "bob": "a"},
         3: {"ann": "a", "bob": "tie", "cat": "a"},
         4: {"ann": "skip", "bob": "b", "cat": "a"},
         5: {"eve": "a"}}
JUDGES = {1: {JUDGE: "a"}, 2: {JUDGE: "b"}, 3: {JUDGE: "b"}, 4: {JUDGE: "b", "judge:other": "tie"}, 5: {JUDGE: "b"}}
GOLD = {1: "a", 2: "b", 4: "b"}
# Worked by hand from the tables above: (n, agree).
PEOPLE = {"ann": (4, 2), "bob": (4, 1), "cat": (4, 1)}  # ann: p1 bob+ cat-, p2 bob-, p3 cat+
VS_JUDGES = {"ann": (3, 2), "bob": (3, 2), "cat": (3, 0), "eve": (1, 0)}
VS_GOLD = {"ann": (2, 2), "bob": (3, 2), "cat": (2, 0)}


def admin_service(database, auth=None, **config) -> AdminService:
    cfg = ServeConfig(**config)
    return AdminService(db=database, config=cfg, labels=LabelService(db=database, config=cfg), auth=auth)


def build_labels(database) -> dict[int, int]:
    """The labels above (plus an undone vote by dan, which counts nowhere); returns pair no -> id."""
    ids = make_pairs(database, len(HUMAN))
    pair = {no: ids[no - 1] for no in HUMAN}
    with database.sessions.begin() as s:
        for no, votes in HUMAN.items():
            for who, choice in votes.items():
                store.add_direct_label(s, pair_id=pair[no], labeler=who, choice=choice, source="human")
        for no, votes in JUDGES.items():
            for judge, choice in votes.items():
                store.add_direct_label(s, pair_id=pair[no], labeler=judge, choice=choice, source=judge)
        undone = store.add_direct_label(s, pair_id=pair[1], labeler="dan", choice="b", source="human")
        s.execute(update(Label).where(Label.id == undone.id).values(undone=True))
    admin = admin_service(database)
    for no, choice in GOLD.items():
        admin.mark_gold(username=None, pair_id=pair[no], choice=choice)
    return pair


def test_agreement_numbers_equal_the_hand_computed_ones(database):
    build_labels(database)
    with database.sessions() as s:
        agreement = store.labeler_agreement(s)
        rows = {r["labeler"]: r for r in labeler_quality(s)}
    assert set(agreement) == {"ann", "bob", "cat", "eve"}  # dan's only vote was undone
    for name, kinds in agreement.items():
        assert kinds["people"] == PEOPLE.get(name, (0, 0)), name
        assert kinds["judges"] == VS_JUDGES.get(name, (0, 0)), name
        assert kinds["gold"] == VS_GOLD.get(name, (0, 0)), name
    assert rows["ann"]["labels"] == 4 and rows["cat"]["labels"] == 3  # ties and skips are labels too
    assert rows["ann"]["people_rate"] == 0.5 and rows["bob"]["gold_rate"] == pytest.approx(2 / 3)
    assert rows["eve"]["people_n"] == 0 and rows["eve"]["people_rate"] is None


def test_the_dashboard_shows_the_quality_table(database):
    build_labels(database)
    data = admin_service(database).dashboard()
    table = labeler_quality_table(data)
    assert list(table.columns) == ["labeler", "labels", "vs people (n · rate)", "vs judges (n · rate)",
                                   "vs gold (n · rate)"]
    by_name = {row["labeler"]: row for row in table.to_dict("records")}
    assert by_name["ann"]["vs people (n · rate)"] == "4 · 50%" and by_name["cat"]["vs gold (n · rate)"] == "2 · 0%"
    assert by_name["eve"]["vs people (n · rate)"] == "–"


def test_agreement_compares_pairs_not_screen_sides(database):
    """Votes through the claim path (random sides shown): stored a/b are the pair's own."""
    make_pairs(database, 3, labels_wanted=2)
    label_all(database, "ann", "a")
    label_all(database, "bob", "b")
    with database.sessions() as s:
        agreement = store.labeler_agreement(s)
    assert agreement["ann"]["people"] == (3, 0) and agreement["bob"]["people"] == (3, 0)


def test_excluded_labelers_take_gold_then_people_then_judges(database):
    build_labels(database)
    with database.sessions() as s:
        strict = store.excluded_labelers(s, min_agreement=0.6, min_n=3)
        assert store.excluded_labelers(s, min_agreement=0.6, min_n=5) == {}  # too little evidence: all kept
        assert set(store.excluded_labelers(s, min_agreement=0.5, min_n=3)) == {"cat"}  # ann at 0.5 is not below
        judged = store.excluded_labelers(s, min_agreement=0.5, min_n=1)
    # bob has 3 gold comparisons (2/3 kept); ann and cat fall back to people (2/4, 1/4)
    assert strict == {"ann": {"basis": "people", "n": 4, "rate": 0.5}, "cat": {"basis": "people", "n": 4, "rate": 0.25}}
    assert judged["eve"] == {"basis": "judges", "n": 1, "rate": 0.0} and "ann" not in judged  # ann: gold 2/2


def test_the_label_reads_leave_excluded_people_out(database):
    pair = build_labels(database)
    with database.sessions() as s:
        everyone = store.unconsumed_labels(s, limit=100)
        kept = store.unconsumed_labels(s, limit=100, exclude_labelers=["ann", "cat"])
        round_kept = store.trainable_labels(s, run="default", sources="all", exclude_labelers=["ann", "cat"])
        judges_kept = store.unconsumed_labels(s, limit=100, exclude_labelers=[JUDGE])
    labeler = {r.id: r.labeler for r in _labels(database)}
    assert sorted(labeler[r.label_id] for r in everyone) == ["ann"] * 3 + ["bob"] * 3 + ["cat"] * 3 + ["eve"]
    assert sorted(labeler[r.label_id] for r in kept) == ["bob"] * 3 + ["eve"]
    assert [r.label_id for r in round_kept] == [r.label_id for r in kept]
    assert len(judges_kept) == len(everyone)  # only people's labels are ever excluded
    assert all(r.pair_id != pair[3] for r in kept)  # bob's tie on p3 is no label to train; ann's/cat's left out


def _labels(database) -> list[Label]:
    with database.sessions() as s:
        return list(s.query(Label))


def _trainer(database, tmp_path, **overrides) -> DPOTrainer:
    cfg = TrainConfig(model="tiny", device="cpu", batch_size=4, **overrides)
    return DPOTrainer(cfg, db=database, adapters_dir=tmp_path / "adapters", model_cache_dir=tmp_path / "models")


def test_the_trainer_skips_people_below_the_threshold_and_logs_it_once(database, tmp_path, caplog):
    build_labels(database)
    labeler = {r.id: r.labeler for r in _labels(database)}
    off = _trainer(database, tmp_path).next_batch()
    assert [labeler[r.label_id] for r in off] == ["ann", "bob", "cat", "ann"]  # threshold off: oldest first
    trainer = _trainer(database, tmp_path, min_labeler_agreement=0.6, agreement_min_n=3)
    with caplog.at_level(logging.WARNING):
        batch = trainer.next_batch()
        again = trainer.next_batch()
    assert sorted(labeler[r.label_id] for r in batch) == ["bob", "bob", "bob", "eve"]
    assert [r.label_id for r in again] == [r.label_id for r in batch]
    excluded_logs = [r.getMessage() for r in caplog.records if "not training on labels of" in r.getMessage()]
    assert len(excluded_logs) == 2 and "'ann'" in excluded_logs[0] and "'cat'" in excluded_logs[1]
    iterative = _trainer(database, tmp_path, mode="iterative", round_labels=4, min_labeler_agreement=0.6,
                         agreement_min_n=3)
    assert iterative.mode._make_plan()
    assert sorted(labeler[i] for i in iterative.mode.labels) == ["bob", "bob", "bob", "eve"]


@pytest.mark.parametrize("overrides,message", [
    ({"min_labeler_agreement": 1.5}, "min_labeler_agreement must be in"),
    ({"min_labeler_agreement": -0.1}, "min_labeler_agreement must be in"),
    ({"agreement_min_n": 0}, "agreement_min_n must be an integer >= 1"),
    ({"mode": "offline", "min_labeler_agreement": 0.5}, "does not apply to mode offline"),
])
def test_bad_agreement_options_are_refused(overrides, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(model="tiny", **overrides)


def test_gold_marking_is_admin_only_and_checks_its_input(database, tmp_path):
    pair = make_pairs(database, 1)[0]
    auth = load_auth(write_users(tmp_path / "u.toml", {"alice": ("a", True), "bob": ("b", False)}))
    admin = admin_service(database, auth)
    for who in ("bob", None):
        with pytest.raises(NotAdminError):
            admin.mark_gold(username=who, pair_id=pair, choice="a")
    for pair_id, choice, message in [("x1", "a", "pair id must be a whole number"), (pair + 99, "a", "no pair"),
                                     (pair, "tie", "gold choice must be 'a' or 'b'")]:
        with pytest.raises(AdminError, match=message) as err:
            admin.mark_gold(username="alice", pair_id=pair_id, choice=choice)
        assert "\n" not in str(err.value)
    with database.sessions() as s:
        assert store.gold_answers(s) == {}  # nothing half-written
    assert admin.mark_gold(username="alice", pair_id=str(pair), choice=" B ") == {"pair_id": pair, "choice": "b"}
    admin.mark_gold(username="alice", pair_id=pair, choice="a")  # a second mark replaces the first
    with database.sessions() as s:
        assert store.gold_answers(s) == {pair: "a"}
        assert store.get_control(s, key=f"gold:{pair}") == {"choice": "a", "by": "alice"}


def test_guidelines_round_trip_and_reach_the_label_page(database, tmp_path):
    configured = tmp_path / "guide.md"
    configured.write_text("# Configured rules", encoding="utf-8")
    auth = load_auth(write_users(tmp_path / "u.toml", {"alice": ("a", True), "bob": ("b", False)}))
    admin = admin_service(database, auth, guidelines=configured)
    assert admin.get_guidelines() == "# Configured rules"
    with pytest.raises(NotAdminError):
        admin.set_guidelines(username="bob", text="# Bob's rules")
    with pytest.raises(AdminError, match="at most 20,000 characters") as err:
        admin.set_guidelines(username="alice", text="x" * (MAX_GUIDELINES_CHARS + 1))
    assert "\n" not in str(err.value) and admin.get_guidelines() == "# Configured rules"  # nothing saved
    assert admin.set_guidelines(username="alice", text="  # Prefer the **honest** answer\n") == \
        "# Prefer the **honest** answer"
    assert guidelines_text(admin.get_guidelines) == "<h1>Prefer the <strong>honest</strong> answer</h1>\n"  # rendered
    assert admin.set_guidelines(username="alice", text="") == "# Configured rules"  # empty: back to configured
    assert admin_service(database).get_guidelines() == DEFAULT_GUIDELINES  # no --guidelines: the built-in ones


def test_the_built_page_shows_the_stored_guidelines(database, common_config):
    from odpo.app.ui.app import build_app
    from odpo.app.web import AppContext

    admin = admin_service(database)
    admin.set_guidelines(username=None, text="# Stored rules")
    demo = build_app(AppContext(common=common_config, db=database, config=ServeConfig()))
    shown = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "odpo-guidelines-text"]
    assert len(shown) == 1 and shown[0].value == "<h1>Stored rules</h1>\n"  # rendered by the server
    editor = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "odpo-guidelines-edit"]
    assert len(editor) == 1
    (on_load,) = [f for f in demo.fns.values() if shown[0] in f.outputs and f.targets[0][1] == "load"]
    admin.set_guidelines(username=None, text="# Edited later")
    assert on_load.fn() == "<h1>Edited later</h1>\n"  # the next page load shows the edit
