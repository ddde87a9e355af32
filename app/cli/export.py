"""`odpo export adapter|merged|gguf|dataset`: take what odpo learned elsewhere.

The functions behind these commands live in trainer/export/exporters.py (the admin tab calls them too) and,
for llama.cpp / Ollama, trainer/export/gguf.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from odpo.app.config import CommonConfig
from odpo.trainer.options import SOURCES

_VERSION = click.option("--version", "version", type=click.IntRange(1), default=None,
                        help="Adapter version (default: the latest committed one).")
_RUN = click.option("--run", default="default", show_default=True, help="Training run name.")
_BASE = click.option("--base-model", default=None,
                     help="Base model spec (default: the one the adapter was trained on).")
_OUT = click.argument("out", type=click.Path(path_type=Path))


@click.group()
def export() -> None:
    """Export an adapter, a merged model, a GGUF for llama.cpp/Ollama, or the preference dataset."""


@export.command("adapter")
@_VERSION
@_RUN
@_BASE
@_OUT
@click.pass_obj
def export_adapter_cmd(cfg: CommonConfig, version: Optional[int], run: str, base_model: Optional[str],
                       out: Path) -> None:
    """A PEFT adapter directory (adapter_config.json, adapter_model.safetensors, README.md) for
    PeftModel.from_pretrained or vLLM --lora-modules. OUT must not exist or be empty."""
    from odpo.trainer.export.exporters import export_adapter

    db = cfg.open_db()
    try:
        path = export_adapter(db, out=out, version=version, run=run, base_model=base_model, base_dir=cfg.data_dir)
    finally:
        db.close()
    click.echo(f"adapter written to {path}")


@export.command("merged")
@_VERSION
@_RUN
@_BASE
@_OUT
@click.pass_obj
def export_merged_cmd(cfg: CommonConfig, version: Optional[int], run: str, base_model: Optional[str],
                      out: Path) -> None:
    """The base model with the adapter merged in (fp32), tokenizer and chat template included,
    for AutoModelForCausalLM.from_pretrained. OUT must not exist or be empty."""
    from odpo.trainer.export.exporters import export_merged

    db = cfg.open_db()
    try:
        path = export_merged(db, out=out, version=version, run=run, base_model=base_model,
                             cache_dir=cfg.model_cache_dir, base_dir=cfg.data_dir)
    finally:
        db.close()
    click.echo(f"merged model written to {path}")


@export.command("gguf")
@_VERSION
@_RUN
@_BASE
@click.option("--merged", is_flag=True,
              help="Merge the adapter into the full-precision base and write the whole model (default: the "
                   "adapter alone, as a llama.cpp LoRA GGUF).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16"]), default=None,
              help="Tensor type (1-D tensors stay f32).  [default: f16 with --merged, else f32]")
@_OUT
@click.pass_obj
def export_gguf_cmd(cfg: CommonConfig, version: Optional[int], run: str, base_model: Optional[str], merged: bool,
                    outtype: Optional[str], out: Path) -> None:
    """For llama.cpp and Ollama: OUT/odpo-vN-lora-f32.gguf (llama-cli -m BASE.gguf --lora it) or, with
    --merged, OUT/odpo-vN-f16.gguf (llama-cli -m it), plus an Ollama Modelfile (ollama create NAME -f
    OUT/Modelfile). Llama-family models. OUT must not exist or be empty."""
    from odpo.trainer.export.gguf import export_gguf

    db = cfg.open_db()
    try:
        path = export_gguf(db, out=out, version=version, run=run, merged=merged, outtype=outtype,
                           base_model=base_model, cache_dir=cfg.model_cache_dir, base_dir=cfg.data_dir)
    finally:
        db.close()
    click.echo(f"{'merged model' if merged else 'LoRA adapter'} GGUF written to {path} (Ollama Modelfile beside it)")


@export.command("dataset")
@_OUT
@click.option("--source", "sources", type=click.Choice(SOURCES), default="all",
              show_default=True, help="Which labels (a person's label wins over a judge's on one pair); all = "
                                      "people and judges, dataset = rows `odpo import dataset` stored.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--run", default="default", show_default=True,
              help="The run whose ledger fills consumed_version (the version that trained each label).")
@click.pass_obj
def export_dataset_cmd(cfg: CommonConfig, out: Path, sources: str, force: bool, run: str) -> None:
    """Labeled pairs as OUT.jsonl or OUT.parquet in TRL's conversational preference format (prompt,
    chosen, rejected) plus labeler, source, adapter version and timestamps. A multi-turn prompt's
    `prompt` lists every earlier turn before the final user message."""
    from odpo.trainer.export.exporters import export_dataset

    db = cfg.open_db()
    try:
        rows = export_dataset(db, out=out, sources=sources, overwrite=force, run=run)
    finally:
        db.close()
    click.echo(f"{rows} preference pairs written to {out}")
