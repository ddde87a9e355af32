"""`odpo bench`: measured numbers behind the README's performance table.

Each bench module exposes ``run(ctx, **options) -> BenchResult``; bench/cli.py turns them into
commands, and bench/common.py holds what they share (result JSON, machine description,
percentiles, ratios, the Markdown table). Benches compare two things measured in the same run
(batched vs one-at-a-time, odpo vs TRL, online vs offline) because on a shared machine only
ratios taken side by side mean anything.

The harness sits beside the product, not in it: no module of odpo.app, odpo.trainer or odpo.db
imports odpo.bench (the CLI loads `odpo.bench.cli:bench` by name when `odpo bench` runs). It ships
in the wheel so `pip install 'odpo[bench]'` can run it; its result files stay in the checkout's
bench/results/ and are not package data.
"""
