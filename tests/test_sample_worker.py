"""Sampler workers as their own processes (`odpo sample`): typed-prompt requests through the
database, heartbeats the web app reads, and two workers against one database (SQLite, and
PostgreSQL when ODPO_TEST_DATABASE_URL is set) with two labelers: no duplicate claims, no request
served twice, both workers serving the latest version."""
from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from odpo.app.cli import cli
from odpo.app.services.sampler_link import WorkerLink
from odpo.app.services.status import NO_WORKER, SAMPLING, waiting_message
from odpo.app.ui.dashboard import state_markdown
from odpo.db import store
from odpo.db.models import Assignment, Label, Pair, Sample, SampleRequest
from tests.db_helpers import rows
from tests.test_sampler import add_prompts, commit, make_sampler, write_adapter

REPO = Path(__file__).resolve().parents[1]


def _prompt(db, text: str = "typed: why is the sky blue?") -> int:
    with db.sessions.begin() as s:
        return store.add_typed_prompt(s, text=text).id


def test_two_workers_never_claim_the_same_request(database):
    ids = [_prompt(database, f"typed {i}") for i in range(6)]
    link = WorkerLink(database)
    for pid in ids:
        link.request_typed(prompt_id=pid, labeler="ann")
    won: dict[str, list[int]] = {}
    barrier = threading.Barrier(2)

    def claim(worker: str) -> None:
        barrier.wait()
        got = []
        for _ in range(6):
            with database.sessions.begin() as s:
                got += [c.id for c in store.claim_sample_requests(s, worker=worker, limit=1)]
        won[worker] = got

    threads = [threading.Thread(target=claim, args=(w,)) for w in ("w1", "w2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(won["w1"] + won["w2"]) == sorted(r.id for r in rows(database, SampleRequest))
    assert not set(won["w1"]) & set(won["w2"])


def test_a_dead_workers_claim_is_taken_over_and_only_the_owner_finishes(database):
    link = WorkerLink(database)
    link.request_typed(prompt_id=_prompt(database), labeler="ann")
    with database.sessions.begin() as s:
        [mine] = store.claim_sample_requests(s, worker="dead", limit=5)
        assert store.claim_sample_requests(s, worker="w2", limit=5) == []  # claimed, not stale yet
        s.execute(update(SampleRequest).values(claimed_at=mine_at(s) - dt.timedelta(minutes=10)))
    with database.sessions.begin() as s:
        [taken] = store.claim_sample_requests(s, worker="w2", limit=5, stale_after_s=300)
        assert taken.id == mine.id
        assert store.finish_sample_requests(s, ids=[mine.id], worker="dead") == 0  # the dead one lost it
        assert store.finish_sample_requests(s, ids=[mine.id], worker="w2") == 1
    assert rows(database, SampleRequest)[0].state == "done"


def mine_at(s) -> dt.datetime:
    return s.scalar(select(SampleRequest.claimed_at))


def test_worker_link_reports_no_worker_then_sums_live_workers(database):
    link = WorkerLink(database, timeout_s=15)
    state = link.state()
    assert state["phase"] == NO_WORKER and "odpo sample" in " ".join(waiting_message(state))
    with database.sessions.begin() as s:
        for name, rate, version in (("a", 6.0, 2), ("b", 4.0, 2)):
            store.set_control(s, key=store.WORKER_PREFIX + name, value={
                "phase": SAMPLING, "pairs_per_minute": rate, "pairs_made": 3, "serving_version": version,
                "queue": 5, "run": "default", "host": "h", "backend": "hf",
                "servers": [{"url": "http://x:8000", "up": False, "last_error": "refused", "next_retry_in_s": 4}]})
        store.set_control(s, key=store.WORKER_PREFIX + "old", value={"phase": SAMPLING, "pairs_per_minute": 99.0})
        s.execute(update(store_control()).where(store_control().key == store.WORKER_PREFIX + "old")
                  .values(updated_at=dt.datetime(2020, 1, 1)))
        store.set_control(s, key=store.WORKER_PREFIX + "gone", value={"phase": "stopped"})
    state = link.state()
    assert state["phase"] == SAMPLING and state["pairs_per_minute"] == 10.0 and state["pairs_made"] == 6
    assert [w["name"] for w in state["workers"]] == ["a", "b"]  # the silent and the stopped one are not counted
    page = state_markdown({"status": _status(), "sampler": state})
    assert "Worker a" in page and "vLLM http://x:8000 **down**, retried in 4.0 s: refused" in page


def store_control():
    from odpo.db.models import Control

    return Control


def _status() -> dict:
    return {"latest_version": 0, "unconsumed_trainable": 0, "prompts": 0, "held_out": 0, "pairs": {}, "labels": {}}


def test_a_typed_prompt_is_served_once_by_one_of_two_samplers(database, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    add_prompts(database)
    first = make_sampler(database, model, tok, worker="w1", queue_size=1, prompts_per_batch=1)
    WorkerLink(database).request_typed(prompt_id=_prompt(database), labeler="ann")
    assert first.state()["typed_pending"] == 1
    assert first.step() == 1  # the typed request goes first, whatever the queue
    second = make_sampler(database, model, tok, worker="w2", queue_size=1, prompts_per_batch=1)
    second.step()
    typed = rows(database, Pair, purpose="typed")
    assert len(typed) == 1 and typed[0].requested_by == "ann"
    [request] = rows(database, SampleRequest)
    assert (request.state, request.worker) == ("done", "w1")


def test_sample_needs_a_vllm_url_for_the_vllm_sampler(tmp_path):
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "sample", "--sampler", "vllm"])
    assert result.exit_code == 2 and "--vllm-url" in result.output and "Traceback" not in result.output


@pytest.mark.timeout(400)
def test_two_workers_two_labelers_one_database(common_config, tiny_model_dir, tmp_path):
    """Two `odpo sample` processes fill one queue while two labelers vote; a committed version
    reaches both; no pair is claimed twice by one labeler or labeled past its wanted count."""
    from odpo.app.config import ServeConfig
    from odpo.app.services.labeling import LabelService

    db = common_config.open_db()
    add_prompts(db)
    workers = [_start_worker(common_config, tiny_model_dir, name) for name in ("w1", "w2")]
    try:
        _wait(lambda: _live(db, phase=SAMPLING) == {"w1", "w2"}, 240, workers)
        service = LabelService(db=db, config=ServeConfig(), sampler=WorkerLink(db))
        votes = _label(service, ["ann", "bob"], n=8, procs=workers)
        path = write_adapter(tiny_model_dir, common_config.adapters_dir() / "v1", seed=1)
        commit(db, path, 1)
        _wait(lambda: all(w.get("serving_version") == 1 for w in _workers(db)) and len(_workers(db)) == 2, 120,
              workers)
        votes += _label(service, ["ann", "bob"], n=4, procs=workers)
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=60) for proc in workers]
    assert codes == [0, 0], [p.stdout.read() for p in workers]
    with db.sessions() as s:
        made_by = {p.requested_by for p in s.scalars(select(Pair))}
        claims = s.execute(select(Assignment.pair_id, Assignment.labeler)).all()
        labels = s.scalars(select(Label)).all()
    assert made_by == {None} and votes == 12 and len(labels) == 12
    assert len(claims) == len(set(claims))  # nobody got one pair twice
    assert all(n <= 1 for n in _labels_per_pair(labels).values())  # overlap 1: one label per pair
    db.close()


def _start_worker(common_config, model_dir: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "odpo", "--data-dir", str(common_config.data_dir), "--db", common_config.db_url,
         "sample", "--model", str(model_dir), "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "6",
         "--queue-size", "4", "--prompts-per-batch", "2", "--name", name],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def _workers(db) -> list[dict]:
    with db.sessions() as s:
        return store.sampler_workers(s, max_age_s=15)


def _live(db, *, phase: str) -> set[str]:
    return {w["name"] for w in _workers(db) if w.get("phase") == phase}


def _wait(condition, timeout: float, procs, dump=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert all(p.poll() is None for p in procs), [p.stdout.read() for p in procs if p.poll() is not None]
        if time.monotonic() > deadline:
            if dump is not None:
                dump.kill()
            raise AssertionError(f"timed out; {dump.stdout.read() if dump is not None else ''}")
        time.sleep(0.3)


def _label(service, labelers: list[str], *, n: int, procs) -> int:
    """n votes, alternating labelers, each on the next pair the service gives them."""
    done = 0
    deadline = time.monotonic() + 240
    while done < n:
        labeler = labelers[done % len(labelers)]
        shown = service.next_pair(labeler=labeler)
        if shown is None:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.3)
            continue
        service.vote(labeler=labeler, assignment_id=shown.assignment_id, side="left")
        done += 1
    return done


def _labels_per_pair(labels) -> dict[int, int]:
    counts: dict[int, int] = {}
    for label in labels:
        counts[label.pair_id] = counts.get(label.pair_id, 0) + 1
    return counts


@pytest.mark.timeout(300)
def test_a_worker_with_the_vllm_sampler_fills_the_queue_and_follows_versions(common_config, tiny_model_dir):
    """`odpo sample --sampler vllm` against the stand-in server: pairs carry the server's token ids,
    a committed version is loaded as `default-v1` and the next pairs are stamped v1."""
    from tests.test_vllm_backend import ADAPTERS, write_adapter
    from tests.vllm_standin import StandinVllm

    db = common_config.open_db()
    add_prompts(db)
    server = StandinVllm(tiny_model_dir, served_name=str(tiny_model_dir)).start()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "odpo", "--data-dir", str(common_config.data_dir), "--db", common_config.db_url,
         "sample", "--model", str(tiny_model_dir), "--sampler", "vllm", "--vllm-url", server.url,
         "--max-new-tokens", "6", "--queue-size", "3", "--prompts-per-batch", "2", "--name", "v",
         "--max-staleness", "0"],  # v1 retires the v0 pairs queued: the next ones come from v1
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    try:
        _wait(lambda: _count(db, created_version=0) >= 3, 120, [worker], dump=worker)
        write_adapter(tiny_model_dir, common_config.data_dir, 1)
        with db.sessions.begin() as s:
            store.commit_adapter_version(s, run="default", version=1, path=str(ADAPTERS / "v1"), parent=None,
                                         step=1, label_steps={}, metrics={})
        _wait(lambda: _count(db, created_version=1) >= 1, 120, [worker], dump=worker)
        # the heartbeat is rewritten every second: wait for the one written after the switch
        _wait(lambda: [w.get("serving_version") for w in _workers(db)] == [1], 30, [worker], dump=worker)
        [state] = _workers(db)
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
        server.kill()
    assert code == 0, worker.stdout.read()
    assert state["backend"] == "vllm" and state["serving_version"] == 1
    assert [s["up"] for s in state["servers"]] == [True]
    assert "default-v1" in {detail["model"] for kind, detail in server.calls if kind == "complete"}
    with db.sessions() as s:
        pair = s.scalars(select(Pair).where(Pair.created_version == 1)).first()
        samples = [s.get(Sample, pair.sample_a_id), s.get(Sample, pair.sample_b_id)]
    assert all(x.adapter_version == 1 and x.token_ids and x.prompt_token_ids for x in samples)
    assert samples[0].prompt_token_ids == samples[1].prompt_token_ids  # one context, two server samples
    db.close()


def _count(db, **where) -> int:
    return len(rows(db, Pair, **where))


def test_up_starts_vllm_serve_itself_only_where_vllm_is_installed(monkeypatch, tmp_path):
    from odpo.app.cli.serve import up, up_children
    from odpo.trainer.sampling import vllm_launch

    monkeypatch.setattr(vllm_launch, "CHECKOUT_VLLM", tmp_path / "no-venv-vllm" / "vllm")  # as if no `make vllm`
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "up", "--sampler", "vllm"])
    assert result.exit_code == 2 and "--vllm-url" in result.output and "Traceback" not in result.output
    assert "make vllm" in result.output
    monkeypatch.setattr(vllm_launch, "find_vllm", lambda explicit=None, environ=None: explicit or "/venv/bin/vllm")
    options = up.make_context("up", ["--sampler", "vllm", "--model", "m", "--train-args", "--lora-r 32"]).params
    serve_child, vllm_child, worker, train = up_children(options)
    assert vllm_child.args == ("vllm-serve", "--model", "m", "--port", "8000", "--max-lora-rank", "32",
                               "--max-loras", "2")
    assert worker.args[-2:] == ("--vllm-url", "http://127.0.0.1:8000") and "--sampler" in worker.args
    options = up.make_context("up", ["--sampler", "vllm", "--vllm-bin", "/opt/vllm/bin/vllm"]).params
    assert up_children(options)[1].args[-2:] == ("--vllm-bin", "/opt/vllm/bin/vllm")  # passed on when given


def test_vllm_serve_execs_vllm_with_lora_and_runtime_loading(monkeypatch, tiny_model_dir, tmp_path):
    from odpo.trainer.sampling import vllm_launch

    monkeypatch.setattr(vllm_launch, "find_vllm", lambda explicit=None, environ=None: explicit or "vllm")
    seen = {}
    monkeypatch.setattr(os, "execve", lambda file, argv, env: seen.update(file=file, argv=argv, env=env))
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "vllm-serve", "--model", str(tiny_model_dir),
                                      "--port", "8123", "--max-lora-rank", "12", "--", "--gpu-memory-utilization",
                                      "0.5"])
    assert result.exit_code == 0, result.output
    assert seen["argv"][:3] == ["vllm", "serve", str(tiny_model_dir)]
    flags = " ".join(seen["argv"])
    assert "--enable-lora --max-lora-rank 16 --max-loras 2" in flags  # 12 rounds up to a rank vLLM accepts
    assert f"--served-model-name {tiny_model_dir}" in flags and flags.endswith("--gpu-memory-utilization 0.5")
    assert seen["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and seen["file"] == "vllm"
    assert seen["env"].get("VLLM_TARGET_DEVICE") == (None if vllm_launch.cuda_gpu_present() else "cpu")
    monkeypatch.undo()
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "vllm-serve", "--vllm-bin", str(tmp_path / "no")])
    assert result.exit_code == 2 and "make vllm" in result.output and "Traceback" not in result.output


def test_serve_names_the_sampling_options_it_leaves_to_workers(monkeypatch, caplog, tmp_path):
    import logging

    import odpo.app.lifecycle as lifecycle
    import odpo.app.web as serve_module

    monkeypatch.setattr(serve_module, "run_serve", lambda *a, **k: None)
    monkeypatch.setattr(lifecycle, "exit_now", lambda code=0: None)
    caplog.set_level(logging.WARNING, logger="odpo.app.cli.serve")
    assert CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "serve"]).exit_code == 0
    assert not [r for r in caplog.records if "holds no model" in r.getMessage()]
    assert CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "serve", "--temperature", "0.5"]).exit_code == 0
    [warning] = [r.getMessage() for r in caplog.records if "holds no model" in r.getMessage()]
    assert warning.startswith("serve holds no model: --temperature apply to `odpo sample` workers")
