"""One import for callers: `from odpo.db import store` then `store.claim_next_pair(...)`.

The functions live in small modules by concern; each takes a Session first and keyword-only
arguments after it, and leaves the transaction to the caller (`with factory.begin() as s:`).
"""
from odpo.db.store_evals import (  # noqa: F401
    DECISIONS,
    LabeledPair,
    PairText,
    find_eval,
    judge_agreement,
    judge_candidates,
    labeled_pairs,
    list_evals,
    list_versions,
    record_eval,
    trained_label_counts,
    version_lineage,
)
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
from odpo.db.store_train_extra import STALE_STEP, count_stale_skipped, skip_stale_labels  # noqa: F401
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
from odpo.db.store_ui import (  # noqa: F401
    adapter_versions,
    count_labels,
    eval_series,
    judge_labels_for_pair,
    labeler_stats,
    labels_per_hour,
    last_train_step,
    mark_shown,
    oldest_open_claim,
    open_claim,
    open_claim_ids,
    train_series,
    typed_pair_waiting,
)
