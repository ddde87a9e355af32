"""The GPU smoke script (bench/gpu_smoke.py) on CPU with the tiny model: every stage runs or says why
not, the hot reload really changes the served weights, the exports load back; and it runs as a
plain-checkout script where odpo is not installed and SQLAlchemy, gradio, vLLM and bitsandbytes are
missing. Runs as subprocesses, one torch thread each, so the script is tested exactly as people run it."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_smoke.py"
STAGES = ("lora_dpo", "qlora_dpo", "hf_sampler", "hot_reload", "export_adapter", "export_merged")
FAST = ["--steps", "2", "--rounds", "1", "--swaps", "2"]
# Made "not installed" in the bare run: find_spec answers None and `import` fails, as for a missing
# package. The editable install's finder is dropped too, so only the script's own shim can find odpo.
MISSING = ("sqlalchemy", "alembic", "gradio", "vllm", "bitsandbytes")
BARE_SITECUSTOMIZE = f"""
import sys
for name in {MISSING!r}:
    sys.modules[name] = None
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
"""


def run_script(args: list[str], cwd: Path, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The script from a directory outside the checkout, CUDA hidden so CPU and GPU machines agree."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=300)


def smoke(tiny_model_dir: Path, root: Path, *, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess,
                                                                                          dict]:
    """One CPU run; its exit status says whether a stage failed (the tests say which may)."""
    out = run_script(["--device", "cpu", "--model", str(tiny_model_dir), "--work-dir", str(root / "work"),
                      "--out", str(root / "smoke.json"), *FAST], root, env=env)
    assert out.returncode in (0, 1) and (root / "smoke.json").is_file(), out.stdout + out.stderr
    report = json.loads((root / "smoke.json").read_text())
    assert out.returncode == int(any(r["status"] == "failed" for r in report["stages"]))
    return out, report


@pytest.fixture(scope="module")
def cpu_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    out, report = smoke(tiny_model_dir, root)
    return out, report, root


@pytest.fixture(scope="module")
def bare_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bare")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(textwrap.dedent(BARE_SITECUSTOMIZE))
    env = {"PYTHONPATH": str(root / "site")}
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print([u.find_spec(n) is None "
                            f"for n in ('odpo', *{MISSING!r})])"], cwd=root, env={**os.environ, **env},
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == str([True] * (1 + len(MISSING))), probe.stdout + probe.stderr
    out, report = smoke(tiny_model_dir, root, env=env)
    return out, report


def stages(report: dict) -> dict[str, dict]:
    return {row["key"]: row for row in report["stages"]}


def test_every_stage_runs_on_cpu_or_says_why_not(cpu_run):
    out, report, _ = cpu_run
    rows = stages(report)
    assert tuple(rows) == STAGES
    for key, row in rows.items():
        assert row["status"] == "ok" or row["reason"], key  # a skip or failure always says why
    for key in ("lora_dpo", "hf_sampler", "hot_reload", "export_adapter", "export_merged"):
        assert rows[key]["status"] == "ok", (key, rows[key]["reason"])
        assert rows[key]["seconds"] > 0
    assert rows["hf_sampler"]["pairs_per_min"] > 0 and rows["hot_reload"]["swap_ms"] > 0
    assert rows["lora_dpo"]["details"]["step_seconds"] and len(rows["lora_dpo"]["details"]["step_seconds"]) == 2
    assert all(row["peak_gpu_mib"] is None for row in rows.values())  # no GPU, no GPU memory column
    table = out.stdout[out.stdout.index("| stage |"):]
    assert all(row["title"] in table for row in rows.values())
    assert "peak GPU MiB" in table and "pairs/min" in table and "swap ms" in table


def test_the_4bit_stage_runs_where_bitsandbytes_does_and_names_the_reason_where_not(cpu_run):
    """Missing bitsandbytes is a skip; installed but unable to run NF4 here is a failure (exit 1)."""
    out, report, _ = cpu_run
    row = stages(report)["qlora_dpo"]
    try:
        from odpo.trainer.policy.loading import check_4bit_support

        check_4bit_support(torch.device("cpu"), torch.float32)
        expected = "ok"
    except ValueError:
        expected = "failed" if importlib.util.find_spec("bitsandbytes") else "skipped"
    assert row["status"] == expected, row["reason"]
    assert out.returncode == (1 if expected == "failed" else 0)
    if expected == "ok":
        assert row["details"]["weights"] == "NF4" and row["seconds"] > 0
    else:
        assert "bitsandbytes" in row["reason"]


def test_the_hot_reload_serves_exactly_the_trained_version(cpu_run):
    row = stages(cpu_run[1])["hot_reload"]["details"]
    assert row["lora_b_norm_before"] == 0.0 < row["lora_b_norm_after"]  # v0 (the base) -> the trained v1
    assert row["logits_max_abs_delta"] > 0 and row["weights_match_version"] is True
    assert len(row["swap_ms"]) == 2 and row["sampled_after_swap_tokens"] > 0


def test_the_exports_load_back_with_peft_and_transformers(cpu_run, tiny_model_dir):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    rows, work = stages(cpu_run[1]), cpu_run[2] / "work"
    adapter_dir = Path(rows["export_adapter"]["details"]["dir"])
    merged_dir = Path(rows["export_merged"]["details"]["dir"])
    assert adapter_dir.parent == merged_dir.parent == work
    version = Path(rows["hot_reload"]["details"]["version_dir"])
    saved = load_file(str(version / "adapter_model.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir))
    live = get_peft_model_state_dict(model)
    assert set(live) == set(saved) and all(torch.equal(live[k], saved[k]) for k in saved)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(base, want, atol=1e-4)


def test_runs_from_a_plain_checkout_without_database_ui_vllm_or_bitsandbytes(bare_run):
    out, report = bare_run
    assert out.returncode == 0, out.stdout + out.stderr
    rows = stages(report)
    assert rows["qlora_dpo"]["status"] == "skipped" and "bitsandbytes" in rows["qlora_dpo"]["reason"]
    assert "QLoRA DPO step (4-bit NF4): skipped: " in out.stdout  # its one printed reason
    others = {k: (r["status"], r["reason"]) for k, r in rows.items() if k != "qlora_dpo"}
    assert all(status == "ok" for status, _ in others.values()), others
    assert rows["hot_reload"]["details"]["weights_match_version"] is True


def test_without_cuda_it_says_so_in_one_line_and_exits_zero(tmp_path):
    out = run_script(["--out", str(tmp_path / "smoke.json")], tmp_path)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("no CUDA device: ") and "--device cpu" in first
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert [r["key"] for r in report["stages"]] == list(STAGES)
    assert {r["status"] for r in report["stages"]} == {"skipped"}
    assert all(r["reason"] == first for r in report["stages"])


def test_bad_input_is_one_line_and_exit_status_2(tmp_path, tiny_model_dir, capsys):
    from odpo.bench.gpu_smoke import main

    assert main(["--device", "cpu", "--model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"gpu-smoke: --model {tmp_path / 'nope'}: model path {tmp_path / 'nope'} does not exist"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert main(["--device", "cpu", "--model", str(tiny_model_dir), "--work-dir", str(tmp_path / "busy")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"gpu-smoke: --work-dir {tmp_path / 'busy'} exists and is not an empty directory"]
    assert main(["--device", "cpu", "--dtype", "fp8"]) == 2
    assert capsys.readouterr().err.startswith("gpu-smoke: dtype must be one of auto, fp32")
    with pytest.raises(SystemExit) as usage:
        main(["--steps", "0"])
    assert usage.value.code == 2 and "argument --steps: 0 is not >= 1" in capsys.readouterr().err


def test_the_import_shim_maps_the_folders_as_pyproject_does():
    from odpo.bench.gpu_smoke import PACKAGE_DIRS

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert PACKAGE_DIRS == config["package-dir"]


def test_odpo_bench_gpu_smoke_passes_its_options_to_the_script(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from odpo.app.cli import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "smoke.json"
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "bench", "gpu-smoke", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("no CUDA device: ") and json.loads(out.read_text())["stages"]
    bad = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "bench", "gpu-smoke", "--batch", "0"])
    assert bad.exit_code == 2 and "argument --batch: 0 is not >= 1" in bad.output
    assert "odpo bench gpu-smoke" in bad.output
