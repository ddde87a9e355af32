"""A generation -> the sample row the database stores: the one conversion the sampler and the blind
eval pairs share."""
from __future__ import annotations

import logging
from typing import Any

from odpo.db import store
from odpo.trainer.sampling.generation import Generated

log = logging.getLogger(__name__)


def stored_sample(g: Generated, *, params: dict[str, Any]) -> store.NewSample:
    """The row to store: the exact ids the model was fed and emitted, and the text without NUL (a
    byte-level vocabulary can decode to it; PostgreSQL text cannot store it). The text is only for
    people and judges (the trainer scores the ids), so NUL is dropped and logged."""
    text = g.text
    if "\x00" in text:
        log.warning("stripped %d NUL character(s) from a sample before storing it", text.count("\x00"))
        text = text.replace("\x00", "")
    return store.NewSample(text=text, tokens=g.tokens, finish_reason=g.finish_reason, params=params,
                           gen_seconds=g.seconds, prompt_token_ids=g.prompt_token_ids, token_ids=g.token_ids)
