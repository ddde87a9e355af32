"""Acceptance: the whole online loop in one process on the tiny model.

import prompts -> the sampler fills the queue -> a py: rule judge labels pairs -> the trainer
commits v1, v2 -> the sampler serves v2 (new pairs stamped v2) with the base model never reloaded.
Everything talks through the database and the adapter directories only, as the separate
processes of `odpo up` do.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from sqlalchemy import select

from odpo.app.config import ServeConfig
from odpo.app.sampler_worker import build_sampler, load_policy
from odpo.app.services.prompt_files import read_prompt_file
from odpo.app.services.prompts import import_prompt_records
from odpo.db import store
from odpo.db.models import Label, Pair, Reload
from tests.concurrency import wait_until
from tests.test_sampler import base_weight

PROMPTS = [f"Tell me something about {thing}." for thing in
           ("the cat", "the river", "Paris in spring", "a bright star", "the old man", "our garden", "the train",
            "a cup of tea", "the blue sky", "the open window", "the last page", "a quiet morning")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.timeout(180)
def test_prompts_to_v2_served_without_reloading_the_base(common_config, tiny_model_dir, tmp_path):
    from odpo.trainer.judges import load_judge
    from odpo.trainer.judges.worker import JudgeWorkerConfig, run_judge_worker
    from odpo.trainer.training.loop import DPOTrainer
    from odpo.trainer.training.train_config import TrainConfig

    started = time.monotonic()
    db = common_config.open_db()
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    result = import_prompt_records(db, read_prompt_file(prompt_file), held_out_fraction=0.0)
    assert result.added == len(PROMPTS)

    cfg = ServeConfig(model=str(tiny_model_dir), queue_size=6, prompts_per_batch=3, max_new_tokens=8,
                      temperature=1.0, device="cpu", dtype="fp32", reload_poll_s=0.1, headless=True)
    model, tok = load_policy(common_config, cfg, db)
    sampler = build_sampler(common_config, cfg, db, model=model, tokenizer=tok)
    weight = base_weight(model)
    ptr, before = weight.data_ptr(), weight.detach().clone()

    judge_stop = threading.Event()
    judge = load_judge("py:tests.rules:prefer_shorter")
    trainer = DPOTrainer(TrainConfig(model=str(tiny_model_dir), batch_size=3, until_version=2, poll_seconds=0.1,
                                     device="cpu", dtype="fp32", lr=5e-3),
                         db=db, adapters_dir=common_config.adapters_dir(), model_cache_dir=tmp_path / "models")
    judge_thread = threading.Thread(target=run_judge_worker, daemon=True, args=(db, judge),
                                    kwargs={"config": JudgeWorkerConfig(poll_seconds=0.1), "stop": judge_stop})
    sampler.start()
    try:
        wait_until(lambda: sampler.state()["queue"] == 6, 30)  # the queue fills before anyone labels
        judge_thread.start()
        trainer.start()
        stats = trainer.run()
        assert stats.exit_reason == "until_version" and trainer.version == 2
        wait_until(lambda: sampler.state()["serving_version"] == 2, 5)
        wait_until(lambda: _pairs_from(db, 2), 30)  # the sampler keeps sampling, now from v2
    finally:
        judge_stop.set()
        sampler.stop()
        trainer.close()
    judge_thread.join(10)

    assert base_weight(model) is weight and weight.data_ptr() == ptr and torch.equal(weight, before)
    with db.sessions() as s:
        reloads = list(s.scalars(select(Reload.version)))
        consumed = [version for version, _ in store.label_uses(s, run="default").values()]
        labelers = set(s.scalars(select(Label.labeler)))
        counts = store.status_counts(s)
    assert reloads[-1] == 2 and set(reloads) <= {1, 2}
    assert set(consumed) == {1, 2} and len(consumed) == 6
    assert labelers == {"judge:py:tests.rules:prefer_shorter"}
    assert counts["adapter_versions"] == [1, 2]
    assert sampler.state()["last_error"] is None
    db.close()
    assert time.monotonic() - started < 90


def _pairs_from(db, version: int) -> list[Pair]:
    with db.sessions() as s:
        return list(s.scalars(select(Pair).where(Pair.created_version == version)))

