"""`odpo sample`: one sampler worker (app/sample.py). Run as many as the hardware allows, on any
host that reaches the database and the adapter directories; `odpo up` starts one."""
from __future__ import annotations

from typing import Any, Optional

import click

from odpo.app.cli.flags import apply_options, click_options, config_from
from odpo.app.config import CommonConfig, SampleConfig
from odpo.trainer.options import DEFAULT_MODEL, VLLM_PORT, LoraSettings


@click.command()
@apply_options(click_options(SampleConfig))
@click.pass_obj
def sample(cfg: CommonConfig, **options: Any) -> None:
    """A sampler worker: keeps the queue of pairs full from the newest committed version."""
    from odpo.app.lifecycle import exit_now
    from odpo.app.sampler_worker import run_sample

    run_sample(cfg, config_from(SampleConfig, options))
    exit_now(0)  # skip the interpreter's seconds-long teardown (see exit_now)


@click.command("vllm-serve")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="The policy's base model (as odpo names it).")
@click.option("--port", type=click.IntRange(1, 65535), default=VLLM_PORT, show_default=True)
@click.option("--max-lora-rank", type=click.IntRange(1), default=LoraSettings.r, show_default=True,
              help="At least the trainer's --lora-r (rounded up to a rank vLLM accepts).")
@click.option("--max-loras", type=click.IntRange(1), default=2, show_default=True,
              help="Adapters one batch may mix: the staleness window plus one.")
@click.option("--vllm-bin", default=None, metavar="PATH",
              help="The vllm executable [default: $ODPO_VLLM_BIN, else the checkout's .venv-vllm (make vllm), "
                   "else vllm on PATH].")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def vllm_serve(cfg: CommonConfig, model: str, port: int, max_lora_rank: int, max_loras: int,
               vllm_bin: Optional[str], extra: tuple[str, ...]) -> None:
    """Start `vllm serve` on the policy's base, ready for odpo's adapter-only hot loads (what
    `odpo up --sampler vllm` runs when no --vllm-url is given). Extra arguments go to vllm."""
    import os

    from odpo.trainer.policy.loading import ModelConfig, model_location
    from odpo.trainer.sampling.vllm_client import VllmError
    from odpo.trainer.sampling.vllm_launch import cuda_gpu_present, find_vllm, vllm_serve_command, vllm_serve_env

    try:
        executable = find_vllm(vllm_bin)
    except VllmError as exc:
        raise click.UsageError(str(exc)) from None
    where = model_location(ModelConfig(spec=model, cache_dir=cfg.model_cache_dir))
    cuda = cuda_gpu_present()
    argv = vllm_serve_command(where, port=port, max_lora_rank=max_lora_rank, max_loras=max_loras,
                              extra=("--served-model-name", model, *extra),  # the name odpo samples the base by
                              executable=executable, cpu=not cuda)
    os.execve(executable, argv, vllm_serve_env(dict(os.environ), cuda=cuda))
