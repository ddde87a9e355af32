"""The ledger's fixed words, importable without SQLAlchemy: which label sources a reader may ask
for and how long a claim lasts. The store functions implement them; the command line and the
trainer's options (trainer/options.py) offer them, and a machine without a database library (the
GPU smoke run) can still import them."""

# Which labels a reader (trainer, export) takes: people, judges, both ("all", the live feedback),
# or imported datasets (labels with source "dataset:<name>"); db/store/labels.py source_filter.
LABEL_SOURCES = ("human", "judge", "all", "dataset")
DATASET_SOURCE_PREFIX = "dataset:"
# An unanswered pair goes back to the queue after this long (serve's --claim-timeout default).
CLAIM_TIMEOUT_S = 600.0
