"""One import for callers: `from odpo.db import store` then `store.claim_next_pair(...)`.

The functions live in small modules by concern; each takes a Session first and keyword-only
arguments after it, and leaves the transaction to the caller (`with factory.begin() as s:`).
"""
from odpo.db.store_pairs import (  # noqa: F401
    ClaimedPair,
    NewSample,
    StoreError,
    add_direct_label,
    add_pair,
    claim_next_pair,
    claimed_view,
    count_pairs,
    last_undoable_label,
    open_assignment,
    record_label,
    release_assignment,
    release_expired,
    retire_pairs_newer_than,
    retire_queue,
    retire_stale_pairs,
    undo_label,
)
from odpo.db.store_prompts import (  # noqa: F401
    ImportResult,
    NewPrompt,
    add_prompts,
    add_typed_prompt,
    count_prompts,
    held_out_prompts,
    list_prompts,
    normalise_prompt,
    pick_prompts_for_sampling,
    prompt_hash,
)
from odpo.db.store_status import get_control, record_reload, set_control, status_counts  # noqa: F401
from odpo.db.store_training import (  # noqa: F401
    LabelsRetracted,
    TrainingLabel,
    commit_adapter_version,
    count_unconsumed,
    get_adapter,
    latest_adapter,
    next_version_number,
    record_train_step,
    rollback_to,
    unconsumed_labels,
)
