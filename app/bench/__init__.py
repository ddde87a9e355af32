"""`odpo bench`: measured numbers behind the README's performance table.

Each bench module exposes ``run(ctx, **options) -> BenchResult``; app/cli_bench.py turns them into
commands, and app/bench/common.py holds what they share (result JSON, machine description,
percentiles, ratios, the Markdown table). Benches compare two things measured in the same run
(batched vs one-at-a-time, odpo vs TRL, online vs offline) because on a shared machine only
ratios taken side by side mean anything.
"""
