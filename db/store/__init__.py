"""The one public store: `from odpo.db import store`, then `store.claim_next_pair(session, ...)`.

Callers import this facade, never a module below it, so functions can move between the entity
modules without touching a caller. Each function takes a Session first and keyword-only arguments
after it, and leaves the transaction to the caller (`with factory.begin() as s:`).

One module per entity, each holding its writes and the reads over it (dashboard queries included):
prompts; pairs (samples and pairs); claims (assignments); labels; adapters (the training ledger:
adapter versions, run heads, train steps, the per-run label ledger); datasets (imported preference
files, the training modes' label reads); evals; control (switches, reloads, status counts); errors
(StoreError, raised by all of them).
"""
from odpo.db.errors import StoreError
from odpo.db.store.adapters import (
    STALE_STEP,
    HeadMoved,
    LabelsRetracted,
    TrainingLabel,
    adapter_versions,
    commit_adapter_version,
    count_stale_skipped,
    count_unconsumed,
    get_adapter,
    label_uses,
    last_train_step,
    latest_adapter,
    list_versions,
    next_version_number,
    record_train_step,
    rollback_to,
    run_head,
    skip_stale_labels,
    train_series,
    trained_label_counts,
    unconsumed_labels,
    version_lineage,
)
from odpo.db.store.claims import (
    ClaimedPair,
    claim_next_pair,
    claimed_view,
    mark_shown,
    oldest_open_claim,
    open_assignment,
    open_claim,
    open_claim_ids,
    release_assignment,
    release_expired,
)
from odpo.db.store.control import (
    JUDGE_STATE_PREFIX,
    TRAIN_FAULT_KEY,
    TRAIN_PROGRESS_KEY,
    controls_with_prefix,
    get_control,
    record_reload,
    set_control,
    status_counts,
    up_state_key,
)
from odpo.db.store.datasets import (
    DATASET_PURPOSE,
    DatasetImport,
    DatasetRow,
    dataset_source,
    import_dataset_rows,
    imported_datasets,
    trainable_labels,
    trained_since,
    used_by_run,
)
from odpo.db.store.evals import eval_series, find_eval, list_evals, record_eval
from odpo.db.store.human_evals import (
    EVAL_PURPOSE,
    add_eval_pair,
    count_eval_pairs,
    drop_judgment,
    human_eval_counts,
    pick_held_out_prompts,
    record_judgment,
)
from odpo.db.store.labels import (
    DATASET_SOURCE_PREFIX,
    DECISIONS,
    LABEL_SOURCES,
    AlreadyAnswered,
    ClaimMoved,
    LabeledPair,
    add_direct_label,
    choices_by_selector,
    count_labels,
    judge_agreement,
    judge_labels_for_pair,
    labeled_pairs,
    labeler_stats,
    labels_per_hour,
    last_undoable_label,
    record_label,
    undo_label,
)
from odpo.db.store.pairs import (
    NewSample,
    PairText,
    SampledIds,
    add_pair,
    count_pairs,
    judge_candidates,
    retire_pairs_newer_than,
    retire_queue,
    retire_stale_pairs,
    sampled_ids,
    typed_pair_waiting,
)
from odpo.db.store.prompts import (
    ImportResult,
    NewPrompt,
    add_prompts,
    add_typed_prompt,
    conversation,
    count_prompts,
    held_out_prompts,
    list_prompts,
    normalise_prompt,
    pair_conversations,
    pick_prompts_for_sampling,
    promote_prompts,
    prompt_hash,
    split_conversation,
    typed_prompts,
)
from odpo.db.store.quality import (
    GOLD_PREFIX,
    excluded_labelers,
    gold_answers,
    labeler_agreement,
    set_gold,
)
from odpo.db.store.sample_requests import (
    WORKER_PREFIX,
    ClaimedRequest,
    add_sample_request,
    claim_sample_requests,
    count_sample_requests,
    finish_sample_requests,
    open_sample_requests,
    release_sample_requests,
    sampler_workers,
)

__all__ = [
    "AlreadyAnswered", "ClaimMoved", "HeadMoved", "label_uses", "run_head",
    "ClaimedPair", "DECISIONS", "ImportResult", "LabeledPair", "LabelsRetracted", "NewPrompt", "NewSample",
    "PairText", "STALE_STEP", "StoreError", "TrainingLabel", "adapter_versions", "add_direct_label", "add_pair",
    "add_prompts", "add_typed_prompt", "choices_by_selector",
    "promote_prompts", "typed_prompts", "claim_next_pair", "claimed_view", "commit_adapter_version", "count_labels",
    "count_pairs", "count_prompts", "count_stale_skipped", "count_unconsumed", "eval_series", "find_eval",
    "get_adapter", "get_control", "held_out_prompts", "judge_agreement", "judge_candidates", "judge_labels_for_pair",
    "labeled_pairs", "labeler_stats", "labels_per_hour", "last_train_step", "last_undoable_label", "latest_adapter",
    "list_evals", "list_prompts", "list_versions", "mark_shown", "next_version_number", "normalise_prompt",
    "oldest_open_claim", "open_assignment", "open_claim", "open_claim_ids", "pick_prompts_for_sampling",
    "prompt_hash", "record_eval", "record_label", "record_reload", "record_train_step", "release_assignment",
    "release_expired", "retire_pairs_newer_than", "retire_queue", "retire_stale_pairs", "rollback_to", "set_control",
    "skip_stale_labels", "status_counts", "train_series", "trained_label_counts", "typed_pair_waiting",
    "unconsumed_labels", "undo_label", "version_lineage",
    "controls_with_prefix", "SampledIds", "sampled_ids", "JUDGE_STATE_PREFIX", "TRAIN_PROGRESS_KEY", "TRAIN_FAULT_KEY",
    "up_state_key",
    # imported datasets and the training modes' label reads (datasets.py)
    "DATASET_PURPOSE", "DATASET_SOURCE_PREFIX", "DatasetImport", "DatasetRow", "LABEL_SOURCES", "dataset_source",
    "import_dataset_rows", "imported_datasets", "trainable_labels", "trained_since", "used_by_run",
    "EVAL_PURPOSE", "add_eval_pair", "count_eval_pairs", "drop_judgment", "human_eval_counts",
    "pick_held_out_prompts", "record_judgment",
    # conversations: a prompt's earlier turns (prompts.py)
    "conversation", "pair_conversations", "split_conversation",
    # labeler quality: agreement with people, judges and gold answers (quality.py)
    "GOLD_PREFIX", "excluded_labelers", "gold_answers", "labeler_agreement", "set_gold",
    # typed-prompt requests and sampler-worker heartbeats (sample_requests.py)
    "WORKER_PREFIX", "ClaimedRequest", "add_sample_request", "claim_sample_requests", "count_sample_requests",
    "open_sample_requests",
    "finish_sample_requests", "release_sample_requests", "sampler_workers",
]
