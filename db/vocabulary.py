"""The ledger's fixed words, importable without SQLAlchemy: which label sources a reader may ask
for and how long a claim lasts. The store functions implement them; the command line and the
trainer's options (trainer/options.py) offer them, and a machine without a database library (the
GPU smoke run) can still import them."""

# Which labels a reader (trainer, export) takes: people, judges, both ("all", the live feedback),
# or imported datasets (labels with source "dataset:<name>"); db/store/labels.py source_filter.
LABEL_SOURCES = ("human", "judge", "all", "dataset")
DATASET_SOURCE_PREFIX = "dataset:"
# A prompt a labeler typed ("ask your own prompt") keeps source TYPED_SOURCE: it is sampled only for
# them, never joins the shared prompt pool, and its pairs' labels never train, until an admin
# promotes it (source PROMOTED_SOURCE). A held-out prompt stays held out whoever types it.
TYPED_SOURCE = "typed"
PROMOTED_SOURCE = "promoted"
# An unanswered pair goes back to the queue after this long (serve's --claim-timeout default).
CLAIM_TIMEOUT_S = 600.0
