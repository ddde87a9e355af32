"""odpo: a self-hosted Online DPO studio.

The one import name the distribution installs. Its subpackages live in the repository's top-level
folders (setuptools `package-dir` in pyproject.toml maps them here):

- ``odpo.app``     (app/)      the command line, the Gradio pages and the services behind both
- ``odpo.trainer`` (trainer/)  everything that touches the model: loading, sampling, judges, DPO
- ``odpo.db``      (db/)       SQLAlchemy models, migrations and the store functions
- ``odpo.static``  (static/)   CSS, JS and logo the web app serves
- ``odpo.bench``   (bench/)    the benchmark harness behind ``odpo bench`` (never imported by the product)

Nothing is imported here, so ``import odpo`` is free of side effects.
"""
