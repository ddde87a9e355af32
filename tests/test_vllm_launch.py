"""Starting vLLM (trainer/sampling/vllm_launch.py: which executable, argv, environment) and timing
the vllm backend beside hf (`odpo bench sampling --sampler vllm`, against tests/vllm_standin.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from odpo.app.cli import cli
from odpo.trainer.sampling import vllm_launch
from odpo.trainer.sampling.vllm_backend import VllmBackend, VllmError
from odpo.trainer.sampling.vllm_launch import (
    RUNTIME_LORA_ENV,
    TARGET_DEVICE_ENV,
    VLLM_BIN_ENV,
    find_vllm,
    vllm_available,
    vllm_lora_rank,
    vllm_serve_command,
    vllm_serve_env,
)
from tests.vllm_standin import StandinVllm


def test_vllm_serve_command_and_bad_urls():
    argv = vllm_serve_command("/models/base", port=8011, max_lora_rank=4, max_loras=2, extra=["--dtype", "bfloat16"])
    assert argv[:3] == ["vllm", "serve", "/models/base"] and argv[-2:] == ["--dtype", "bfloat16"]
    def flag(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert "--enable-lora" in argv and flag("--port") == "8011" and flag("--max-loras") == "2"
    assert flag("--max-lora-rank") == "8"  # rank 4 rounds up to the smallest rank vLLM accepts
    assert vllm_lora_rank(16) == 16 and vllm_lora_rank(100) == 128
    with pytest.raises(VllmError):
        vllm_lora_rank(1024)
    assert vllm_serve_command("/m", port=1, max_lora_rank=8, max_loras=1, executable="/v/bin/vllm")[0] == "/v/bin/vllm"
    on_cpu = vllm_serve_command("/m", port=1, max_lora_rank=8, max_loras=1, cpu=True, extra=["--seed", "1"])
    assert on_cpu[-6:] == ["--dtype", "float32", "--kv-cache-memory-bytes", "2G", "--seed", "1"]
    assert "--dtype" not in argv[:-2] and "--kv-cache-memory-bytes" not in argv  # a GPU: vLLM's own defaults
    chosen = vllm_serve_command("/m", port=1, max_lora_rank=8, max_loras=1, cpu=True,
                                extra=["--dtype=bfloat16", "--gpu-memory-utilization", "0.3"])
    assert chosen.count("--dtype") == chosen.count("--kv-cache-memory-bytes") == 0  # the caller's choice stands
    assert vllm_serve_env({"PATH": "/bin"}, cuda=True) == {"PATH": "/bin", RUNTIME_LORA_ENV: "True"}
    # no CUDA GPU: the CPU platform, whatever the wheel's name says (else its AVX-512 kernels may load)
    assert vllm_serve_env({"PATH": "/bin"}, cuda=False) == {"PATH": "/bin", RUNTIME_LORA_ENV: "True",
                                                            TARGET_DEVICE_ENV: "cpu"}
    assert vllm_serve_env({"PATH": "/nowhere"})[TARGET_DEVICE_ENV] == "cpu"  # no nvidia-smi: no GPU
    assert not vllm_launch.cuda_gpu_present({"PATH": "/bin:/usr/bin", "CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(VllmError, match="not an http"):
        VllmBackend(db=None, urls=["localhost:8000"], run="default", tokenizer=None, base_model="x")


def test_find_vllm_takes_the_option_then_the_env_then_the_checkouts_venv_then_path(monkeypatch, tmp_path):
    def executable(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
        return path

    given, from_env = executable(tmp_path / "given" / "vllm"), executable(tmp_path / "env" / "vllm")
    on_path, checkout = executable(tmp_path / "bin" / "vllm"), tmp_path / "checkout" / ".venv-vllm" / "bin" / "vllm"
    monkeypatch.setattr(vllm_launch, "CHECKOUT_VLLM", checkout)
    path_only = {"PATH": str(tmp_path / "bin")}
    env = {**path_only, VLLM_BIN_ENV: str(from_env)}
    assert find_vllm(str(given), env) == str(given)
    assert find_vllm(None, env) == str(from_env)
    beside = Path(sys.executable).parent / "vllm"  # vLLM installed into odpo's own venv
    assert find_vllm(None, path_only) == str(beside if beside.exists() else on_path)
    executable(checkout)  # `make vllm` built the checkout's venv: it comes first
    assert find_vllm(None, path_only) == str(checkout)
    with pytest.raises(VllmError, match=r"--vllm-bin '/no/vllm' is not an executable vllm; build one with `make vllm`"):
        find_vllm("/no/vllm", env)
    with pytest.raises(VllmError, match=f"{VLLM_BIN_ENV} '/no/vllm' is not"):
        find_vllm(None, {VLLM_BIN_ENV: "/no/vllm"})
    checkout.unlink()
    if not beside.exists():
        with pytest.raises(VllmError, match=r"^no vllm executable found: run `make vllm` .* pass --vllm-url$"):
            find_vllm(None, {"PATH": str(tmp_path / "empty")})
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        monkeypatch.delenv(VLLM_BIN_ENV, raising=False)
        assert vllm_available() is False


def test_the_sampling_bench_times_the_vllm_backend_beside_hf(tiny_model_dir, tmp_path):
    out, server = tmp_path / "results", StandinVllm(tiny_model_dir).start()  # served as --model names it
    args = ["--data-dir", str(tmp_path / "data"), "bench", "sampling", "--quick", "--model", str(tiny_model_dir),
            "--device", "cpu", "--dtype", "fp32", "--out", str(out), "--rounds", "2", "--prompts-per-batch", "2",
            "--max-new-tokens", "4", "--sampler", "vllm"]
    try:
        refused = CliRunner().invoke(cli, args)
        res = CliRunner().invoke(cli, [*args, "--vllm-url", server.url])
    finally:
        server.kill()
    assert refused.exit_code == 2 and "--vllm-url" in refused.output and "Traceback" not in refused.output
    assert res.exit_code == 0, res.output
    m = json.loads((out / "sampling-quick.json").read_text())["metrics"]
    assert (m["vllm_batched"]["calls"], m["vllm_batched"]["pairs"]) == (2, 4.0) == (m["batched"]["calls"], 4.0)
    assert m["first_pair_seconds"]["vllm"] > 0 and m["first_pair_seconds"]["hf"] > 0
    assert [d["prompts"] for kind, d in server.calls if kind == "complete"] == [1] * 5  # seeded: one request a prompt
    assert "vLLM / hf batched pairs/minute" in res.output
