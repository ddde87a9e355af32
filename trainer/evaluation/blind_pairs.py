"""Blind human evaluation, the model side: which pairs become eval pairs, and their samples.

An eval pair is a held-out prompt answered once by the policy and once by a reference (the base:
the same module under `disable_adapter()`, or an earlier version loaded into the adapter). People
see it exactly like a training pair; their votes become judgments (db/store/human_evals.py), never
training data. Two ways in:

- the sampler (`odpo serve --human-eval-share S`): `EvalCadence` makes every 1/S-th pair it
  queues an eval pair against the base, deterministically (share 0.2: pairs 5, 10, 15, ...);
- on demand (`odpo eval --human`): `queue_human_eval` answers n held-out prompts with a version
  and a reference and queues them all in one transaction.
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any, Optional, Sequence

from odpo.db import store
from odpo.db.engine import Database
from odpo.trainer.policy.batching import PromptInput
from odpo.trainer.sampling.generation import Generated, SamplingParams, generate
from odpo.trainer.sampling.samples import stored_sample

log = logging.getLogger(__name__)

SERVING_ADAPTER = "default"  # the LoRA adapter hot reloads write into
REFERENCE_ADAPTER = "reference"  # an earlier version eval pairs answer with



class EvalCadence:
    """Which of the sampler's pairs are eval pairs, and which side the policy's sample is stored on.

    Pair k (counting from 1) is an eval pair when floor(k * share) steps up: exactly `share` of the
    pairs in the long run, evenly spread, and the same sequence on every run (no RNG involved)."""

    def __init__(self, share: float, *, seed: Optional[int] = None) -> None:
        if not 0.0 <= share < 1.0:
            raise ValueError("human eval share must be in [0, 1): 0.1 makes 1 pair in 10 an eval pair")
        self.share = share
        self.count = 0
        self._rng = random.Random(seed)

    def next_is_eval(self) -> bool:
        """Advance by one pair; True when that pair is an eval pair."""
        self.count += 1
        return _steps(self.count, self.share) > _steps(self.count - 1, self.share)

    def plan(self, slots: int) -> list[bool]:
        """The eval flags of the next `slots` pairs."""
        return [self.next_is_eval() for _ in range(max(0, slots))]

    def policy_side(self) -> str:
        """Store the policy's sample as a or b at random (sides on screen are random anyway)."""
        return self._rng.choice("ab")


def interleave(flags: Sequence[bool], train: Sequence[Any], evals: Sequence[Any]) -> list[Any]:
    """Training and eval jobs in slot order (an eval slot without an eval job takes a training job)."""
    train, evals = list(train), list(evals)
    out = []
    for flag in flags:
        source = evals if flag and evals else train
        if source:
            out.append(source.pop(0))
    return out + train + evals


def _steps(k: int, share: float) -> int:
    return math.floor(k * share + 1e-9)  # 0.29 * 100 is 28.999..., still pair 100's step


def reference_answers(model: Any, tokenizer: Any, texts: Sequence[PromptInput], *, params: SamplingParams,
                      **generate_kwargs: Any) -> list[Generated]:
    """One answer per prompt from the base (the adapter switched off), with the same params and
    prompt rendering as the policy's samples, so the two samples of a pair share their prompt ids."""
    with model.disable_adapter():
        out = generate(model, tokenizer, list(texts), params=params, n_per_prompt=1, **generate_kwargs)
    return [rows[0] for rows in out]


def with_references(model: Any, tokenizer: Any, outputs: list[list[Generated]], *, at: Sequence[int],
                    texts: Sequence[PromptInput], params: SamplingParams, adapter: Optional[str] = None,
                    **generate_kwargs: Any) -> list[list[Generated]]:
    """The sampler's batch with the rows `at` (eval jobs, prompts `texts`) turned into eval pairs:
    each keeps its first policy sample and gets the reference's answer as the second: the base, or
    with `adapter` that LoRA adapter (an earlier version, `reference_adapter`). Called under the
    sampler's model lock, so no hot reload lands between the two."""
    if not at:
        return outputs
    if adapter is None:
        refs = reference_answers(model, tokenizer, texts, params=params, **generate_kwargs)
    else:
        model.set_adapter(adapter)
        try:
            refs = [rows[0] for rows in generate(model, tokenizer, list(texts), params=params, **generate_kwargs)]
        finally:
            model.set_adapter(SERVING_ADAPTER)
    outputs = list(outputs)
    for i, ref in zip(at, refs, strict=True):
        outputs[i] = [outputs[i][0], ref]
    return outputs


def reference_adapter(model: Any, db: Database, *, run: str, version: int, base_dir: Optional[Path]) -> str:
    """Committed `version` as a second LoRA adapter beside the serving one, loaded once: the
    sampler's eval pairs then answer with it (`--human-eval-reference`). Hot reloads only touch
    the serving adapter, so the reference stays put. Raises ValueError (one line) when the run has
    no such version."""
    from odpo.trainer.policy.checkpoint import load_adapter_into, read_lora_settings
    from odpo.trainer.policy.lora import peft_config
    from odpo.trainer.sampling.hotreload import resolve_adapter_path

    if REFERENCE_ADAPTER in model.peft_config:
        return REFERENCE_ADAPTER
    with db.sessions() as s:
        row = store.get_adapter(s, run=run, version=version)
        path = None if row is None or row.rolled_back else resolve_adapter_path(row.path, base_dir)
    if path is None:
        raise ValueError(f"--human-eval-reference {version}: run {run!r} has no live version v{version}")
    model.add_adapter(REFERENCE_ADAPTER, peft_config(read_lora_settings(path)))
    load_adapter_into(model, path, adapter_name=REFERENCE_ADAPTER)
    model.set_adapter(SERVING_ADAPTER)
    model.eval()
    log.info("blind eval pairs answer with v%d as the reference", version)
    return REFERENCE_ADAPTER


def queue_human_eval(db: Database, *, policy: Any, tokenizer: Any, version: int, reference: int, n: int,
                     params: SamplingParams, run: str = "default", holds: Optional[int] = None,
                     base_dir: Optional[Path] = None, autocast_dtype: Any = None,
                     labels_wanted: int = 1) -> list[int]:
    """Answer n held-out prompts with `version` and with `reference`, and queue them as eval pairs
    in ONE transaction (all or none); returns the pair ids. `policy` is a PeftModel whose adapter
    holds `holds`; other versions are loaded into it (trainer.policy.checkpoint.load_adapter_into)."""
    from odpo.trainer.evaluation.win_rate import EvalError, adapter_path, each_version, eval_prompts, policy_answers

    if version == reference:
        raise EvalError(f"the policy and the reference are both v{version}; pick two different versions")
    paths = {v: adapter_path(db, version=v, run=run, base_dir=base_dir) for v in (version, reference) if v}
    chosen = eval_prompts(db, n=n)
    texts = [text for _, text in chosen]
    answers = each_version(policy, paths=paths, versions=(version, reference), holds=holds,
                           answer=lambda v: policy_answers(policy, tokenizer, texts, version=v, params=params,
                                                            autocast_dtype=autocast_dtype))
    stamp = params.as_dict()
    sides = EvalCadence(0.0, seed=params.seed)
    with db.writes.begin() as s:
        ids = [store.add_eval_pair(s, prompt_id=pid, version=version, reference_version=reference,
                                   policy=stored_sample(mine, params=stamp),
                                   reference=stored_sample(ref, params=stamp),
                                   policy_side=sides.policy_side(), labels_wanted=labels_wanted).id
               for (pid, _), mine, ref in zip(chosen, answers[version], answers[reference], strict=True)]
    log.info("queued %d eval pairs: v%d against %s", len(ids), version, f"v{reference}" if reference else "base")
    return ids
