"""`odpo train` under `accelerate launch` (trainer/training/distributed.py): 2 CPU processes (gloo) train
the same steps as 1 process, only rank 0 touches the database, and the followers mirror every
weight change rank 0 decides (start, steps, rollback reloads)."""
from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from sqlalchemy import select

from odpo.db import store
from odpo.db.engine import Database
from odpo.db.models import Adapter, TrainStep
from odpo.trainer.training import distributed
from odpo.trainer.training.distributed import Command, Distributed, Follower, shard_bounds
from odpo.trainer.training.loop import DPOTrainer
from tests.db_helpers import label_all
from tests.model_fixtures import tiny_train_config

# Both launches in one pytest-xdist worker: two 2-process gloo groups rendezvousing at once on
# 2 loaded cores hung one of them for the whole 600 s timeout.
pytestmark = pytest.mark.xdist_group("accelerate")

log = logging.getLogger(__name__)

ACCELERATE = Path(sys.executable).with_name("accelerate")
LAUNCH_TIMEOUT_S = 600  # two model-loading processes on a loaded 2-core box
N_LABELS, BATCH, STEPS = 15, 5, 3  # 5 pairs over 2 ranks: slices of 3 and 2 (uneven on purpose)
LR = 2e-2  # large enough that 3 steps move the loss well beyond the comparison's tolerance
# Adam divides by sqrt(v) + eps: a weight whose gradient is near eps turns the last-bit differences
# of a 2-way sum into update differences (measured 4e-5 on one of 256 weights), so the adapter
# files are compared to 1% of one step's size; the losses and gradient norms match to ~1e-7.
WEIGHT_ATOL = 0.01 * LR

# Loaded into every launched Python (PYTHONPATH): each worker rank notes that it started and every
# SQLite database it connects to (Python's "sqlite3.connect" audit event), so the test can see
# that rank 1 never opened the database, not just that the product says so. At exit (this atexit
# handler runs last) each rank notes whether its process group was still alive: one left to
# interpreter shutdown can SIGABRT a finished run (gloo's threads), so both must be torn down.
AUDIT_SITECUSTOMIZE = '''
import atexit, os, sys
_rank, _out = os.environ.get("RANK"), os.environ.get("ODPO_TEST_AUDIT_DIR")
if _rank is not None and _out:
    open(os.path.join(_out, "rank%s.started" % _rank), "w").close()
    def _odpo_exit():
        dist = sys.modules.get("torch.distributed")
        alive = bool(dist is not None and dist.is_available() and dist.is_initialized())
        with open(os.path.join(_out, "rank%s.exit" % _rank), "w") as f:
            f.write("process group alive" if alive else "process group destroyed")
    atexit.register(_odpo_exit)
    def _odpo_audit(event, args):
        if event == "sqlite3.connect":
            with open(os.path.join(_out, "rank%s.sqlite" % _rank), "a") as f:
                f.write("%s\\n" % (args[0],))
    sys.addaudithook(_odpo_audit)
'''


def _sample(prompt_ids: list[int], ids: list[int]) -> store.NewSample:
    return store.NewSample(text=" ".join(map(str, ids)), tokens=len(ids), finish_reason="stop",
                           params={"temperature": 1.0}, gen_seconds=0.01, prompt_token_ids=prompt_ids, token_ids=ids)


def exact_token_labels(db: Database, n: int, *, seed: int = 0) -> list[int]:
    """n pairs whose samples carry token ids (prompts and answers of varied lengths, so the ranks'
    slices pad differently), each labeled 'a'; their label ids."""
    rng = random.Random(seed)
    with db.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=f"exact prompt {i}") for i in range(n)])
    with db.sessions.begin() as s:
        for p in store.pick_prompts_for_sampling(s, n=n):
            prompt_ids = [rng.randrange(10, 500) for _ in range(rng.randint(3, 9))]
            a, b = ([rng.randrange(10, 500) for _ in range(rng.randint(2, 10))] for _ in range(2))
            store.add_pair(s, prompt_id=p.id, version=0, a=_sample(prompt_ids, a), b=_sample(prompt_ids, b))
    return label_all(db, "alice", "a")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_args(data_dir: Path, tiny_model_dir: Path, scenario: list[str]) -> list[str]:
    return ["--data-dir", str(data_dir), "--db", f"sqlite:///{data_dir / 'odpo.sqlite3'}", "train",
            "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32", "--batch-size", str(BATCH),
            "--grad-accum", "2", "--lr", str(LR), "--seed", "0", "--lora-r", "4", "--lora-alpha", "8",
            "--lora-dropout", "0", "--threads", "1", "--poll-seconds", "0.05", *scenario]


# name -> (options, what rank 0 reports, (version, parent, step) of the commits)
SCENARIOS = {
    # 3 steps of 5 pairs (slices of 3 and 2, each in 2 micro-batches), a version every 2 steps
    "online": (["--max-steps", "3", "--save-every", "2", "--exit-when-idle", "0"],
               "trained 3 step(s); committed v1, v2;", [(1, 0, 2), (2, 1, 3)]),
    # one round of 11 labels in batches of 5, 5 and 1 (the last leaves rank 1 an empty slice), then
    # no labels for round 2: rank 0 idles (the followers hear heartbeats) until --exit-when-idle
    "iterative": (["--mode", "iterative", "--round-labels", "11", "--exit-when-idle", "0.5"],
                  "trained 3 step(s); committed v1;", [(1, 0, 3)]),
}


def _steps(data_dir: Path) -> list[TrainStep]:
    db = Database(f"sqlite:///{data_dir / 'odpo.sqlite3'}")
    try:
        with db.sessions() as s:
            return list(s.scalars(select(TrainStep).order_by(TrainStep.id)))
    finally:
        db.close()


def _commits(data_dir: Path) -> tuple[list[tuple[int, int, int]], dict[int, tuple[int, int]]]:
    """(version, parent, step) of every adapters row, and the run's ledger (label -> version, step)."""
    db = Database(f"sqlite:///{data_dir / 'odpo.sqlite3'}")
    try:
        with db.sessions() as s:
            rows = [(a.version, a.parent, a.step) for a in s.scalars(select(Adapter).order_by(Adapter.id))]
            return rows, store.label_uses(s)
    finally:
        db.close()


@pytest.fixture
def two_copies(tmp_path) -> tuple[Path, Path]:
    """The same database (N exact-token labels) in two data dirs: one per run."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    db = Database(f"sqlite:///{one / 'odpo.sqlite3'}")
    try:
        exact_token_labels(db, N_LABELS)
    finally:
        db.close()  # checkpoints the WAL: the file alone is the whole database
    shutil.copytree(one, two)
    return one, two


def _launch_two(data_dir: Path, tiny_model_dir: Path, scenario: list[str], tmp_path: Path) -> tuple[str, Path]:
    """`accelerate launch` 2 CPU processes of `odpo train`; (stdout, the audit hook's folder)."""
    audit, hook = tmp_path / "audit", tmp_path / "hook"
    audit.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_SITECUSTOMIZE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ODPO_TEST_AUDIT_DIR": str(audit),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    # --multi_gpu is accelerate's torchrun launcher; on CPU (odpo's --device cpu) the ranks talk gloo.
    # (`accelerate launch --cpu --num_processes 2` would start ONE process: accelerate's multi-CPU is MPI.)
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "odpo", *_train_args(data_dir, tiny_model_dir, scenario)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stdout}\n{result.stderr[-6000:]}"
    return result.stdout, audit


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate's launcher is not installed")
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_two_processes_train_what_one_process_trains(name, two_copies, tiny_model_dir, tmp_path):
    from odpo.app.cli import cli

    scenario, summary, commits = SCENARIOS[name]
    one, two = two_copies
    single = CliRunner().invoke(cli, _train_args(one, tiny_model_dir, scenario))  # a plain `odpo train`
    assert single.exit_code == 0 and summary in single.output, single.output
    stdout, audit = _launch_two(two, tiny_model_dir, scenario, tmp_path)
    assert stdout.count(summary) == 1, stdout  # rank 0 alone reports

    a, b = _steps(one), _steps(two)
    assert [s.step for s in b] == [1, 2, 3] and [s.label_ids for s in b] == [s.label_ids for s in a]
    for x, y in zip(a, b, strict=True):
        assert y.metrics.keys() == x.metrics.keys()
        # kl is a difference of two sums of log-probs (~-30 each): fp32 rounding of those sums, which
        # two processes reduce in another order, is ~1e-6 of them, so its absolute tolerance scales too
        scale = max(1.0, abs(x.metrics["logps_chosen"]), abs(x.metrics["logps_rejected"]))
        for key in sorted(x.metrics.keys() - {"seconds", "pairs_per_second"}):  # the global batch's metrics
            tol = 1e-6 * scale if key == "kl" else 1e-6
            assert y.metrics[key] == pytest.approx(x.metrics[key], rel=1e-4, abs=tol), (x.step, key)
    assert abs(a[2].loss - a[0].loss) > 1e-3  # the weights moved: the comparison is not of two no-ops
    log.info("%s step seconds: 1 process %s, 2 processes %s", name, [round(s.seconds, 3) for s in a],
             [round(s.seconds, 3) for s in b])

    assert _commits(two) == _commits(one) and _commits(two)[0] == commits
    last = f"v{commits[-1][0]}"
    adapters = two / "runs" / "default" / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == [f"v{c[0]}" for c in commits]  # one writer, no leftover
    w1 = load_file(str(one / "runs" / "default" / "adapters" / last / "adapter_model.safetensors"))
    w2 = load_file(str(adapters / last / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=WEIGHT_ATOL)

    assert sorted(p.name for p in audit.glob("*.started")) == ["rank0.started", "rank1.started"]
    assert (audit / "rank0.sqlite").read_text().strip()  # the hook sees rank 0's connections...
    assert not (audit / "rank1.sqlite").exists()  # ...and rank 1 made none
    for rank in (0, 1):  # a clean exit tears the process group down on every rank
        assert (audit / f"rank{rank}.exit").read_text() == "process group destroyed"


@pytest.mark.parametrize("n", range(0, 10))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_the_batch_in_order_and_evenly(n, world):
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(n))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_a_plain_process_gets_no_accelerator(monkeypatch, tiny_model_dir):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.start_distributed(tiny_train_config(tiny_model_dir)) is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # `accelerate launch --num_processes 1` is one process too
    assert distributed.start_distributed(tiny_train_config(tiny_model_dir)) is None


class Recording(Distributed):
    """Rank 0 of a world of one that keeps what it would broadcast, for a follower to replay."""

    def __init__(self, accelerator) -> None:
        super().__init__(accelerator)
        self.sent: list[Command] = []

    def send(self, command: Command) -> None:
        self.sent.append(command)
        super().send(command)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True, mixed_precision="no")
    AcceleratorState._reset_state(True)  # the state is process-wide: leave none for other tests


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_a_follower_replaying_rank_0s_commands_holds_its_weights_across_a_rollback(
        database, tmp_path, tiny_model_dir, accelerator):
    exact_token_labels(database, 8)
    cfg = tiny_train_config(tiny_model_dir, batch_size=2, max_steps=2)
    leader = Recording(accelerator)
    trainer = DPOTrainer(cfg, db=database, adapters_dir=tmp_path / "runs" / "default" / "adapters",
                         model_cache_dir=tmp_path / "models", dist=leader)
    try:
        trainer.start()
        assert trainer.run().versions == [1, 2]
        with database.sessions.begin() as s:
            store.rollback_to(s, version=1)
        assert trainer.train_available() is True  # reloads v1 (mirrored), then one step from it
        leader.finish()
    finally:
        trainer.close()
    assert [c.kind for c in leader.sent] == ["init", "load", "step", "step", "load", "step", "stop"]
    assert leader.sent[1].path is None and leader.sent[4].path.endswith("v1")

    follower = Follower(Distributed(accelerator), cfg, model_cache_dir=tmp_path / "models")
    for command in leader.sent[:-1]:
        follower.apply(command)
    assert follower.steps == 3
    mine, theirs = _lora(trainer.model), _lora(follower.model)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(not torch.equal(p, torch.zeros_like(p)) for k, p in theirs.items() if "lora_B" in k)


def test_a_followers_dropout_stream_is_its_own_and_leaves_the_shared_one_alone():
    """Ranks restore the same RNG state from each version; a follower's step must not reuse rank 0's
    masks (correlated dropout) nor move the shared stream, and a replay must draw the same masks."""
    torch.manual_seed(123)
    shared = torch.get_rng_state()
    draws = {}
    for rank, step in [(1, 5), (2, 5), (1, 6), (1, 5)]:
        with distributed.own_dropout_stream(0, step, rank):
            draws.setdefault((rank, step), []).append(torch.rand(8))
    assert torch.equal(torch.get_rng_state(), shared)
    assert torch.equal(draws[(1, 5)][0], draws[(1, 5)][1])
    assert not torch.equal(draws[(1, 5)][0], draws[(2, 5)][0])
    assert not torch.equal(draws[(1, 5)][0], draws[(1, 6)][0])
    assert not torch.equal(draws[(1, 5)][0], torch.rand(8))  # not the shared stream's next draw
