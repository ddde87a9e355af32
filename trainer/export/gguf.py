"""`odpo export gguf`: a committed version for llama.cpp and Ollama.

Without --merged the version's LoRA becomes a llama.cpp LoRA adapter GGUF, applied at load time
on the base model it was trained on (`llama-cli -m base.gguf --lora adapter.gguf`, Ollama's
ADAPTER); it is small and stays exact (f32 by default). With --merged the adapter is merged into
the base model's full-precision weights (trainer/export/exporters.py's export_merged does the merge) and
the whole model is written as one GGUF (f16 by default). An Ollama Modelfile goes beside either.

OUT is a directory, written whole or not at all (staged_dir), holding `odpo-v<N>[-lora]-<type>.gguf`
and `Modelfile`. The format work lives in trainer/export/gguf_writer.py.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from odpo.db.engine import Database
from odpo.trainer.export.exporters import ExportError, base_model_spec, export_merged, resolve_version, staged_dir
from odpo.trainer.export.gguf_writer import OUTTYPES, gguf_arch, write_lora_gguf, write_model_gguf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseModel:
    """The model a version was trained on: its spec, where transformers loads it from, the GGUF it
    was converted from (None for a checkpoint or hub id), and its config and tokenizer."""

    spec: str
    location: str
    gguf: Optional[Path]
    config: Any
    tokenizer: Any


def load_base(spec: str, cache_dir: Optional[Path] = None) -> BaseModel:
    """Config and tokenizer of the base model, without its weights; a GGUF base is read from its
    converted checkpoint (the one training used, converted now if it is missing)."""
    from transformers import AutoConfig, AutoTokenizer

    from odpo.trainer.policy.gguf_cache import ensure_gguf_cached
    from odpo.trainer.policy.loading import ModelConfig, resolve_model_spec

    try:
        source = resolve_model_spec(spec)
        gguf_file = Path(source.location) if source.kind == "gguf" else None
        location = source.location
        if gguf_file is not None:
            location = str(ensure_gguf_cached(gguf_file, ModelConfig.for_spec(spec, cache_dir=cache_dir).cache_dir))
        config, tokenizer = AutoConfig.from_pretrained(location), AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the base model {spec!r}: {exc}; pass --base-model") from None
    return BaseModel(spec, location, gguf_file, config, tokenizer)


def export_gguf(db: Database, *, out: Path, version: Optional[int] = None, run: str = "default",
                merged: bool = False, outtype: Optional[str] = None, base_model: Optional[str] = None,
                cache_dir: Optional[Path] = None, base_dir: Optional[Path] = None) -> Path:
    """Write OUT/<name>.gguf (the adapter, or with `merged` the merged model) and OUT/Modelfile;
    returns the .gguf's path. Errors are one-line ExportErrors, raised before any heavy work where
    they can be (unknown version, architecture or outtype, a non-empty OUT)."""
    outtype = outtype or ("f16" if merged else "f32")
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown GGUF outtype {outtype!r}; expected {', '.join(OUTTYPES)}")
    row, src = resolve_version(db, version=version, run=run, base_dir=base_dir)
    spec = base_model_spec(src, base_model)
    base = load_base(spec, cache_dir)
    gguf_arch(base.config)
    file_name = f"odpo-v{row.version}{'' if merged else '-lora'}-{outtype}.gguf"
    title = f"odpo v{row.version} ({spec}{'' if merged else ' LoRA'})"
    with staged_dir(out) as tmp:
        if merged:
            checkpoint = export_merged(db, out=tmp / ".merged-checkpoint", version=row.version, run=run,
                                       base_model=base_model, cache_dir=cache_dir, base_dir=base_dir)
            try:
                write_model_gguf(checkpoint, tmp / file_name, outtype=outtype, name=title, tokenizer_gguf=base.gguf)
            finally:
                shutil.rmtree(checkpoint, ignore_errors=True)
        else:
            write_lora_gguf(src, tmp / file_name, config=base.config, outtype=outtype, name=title)
        modelfile = render_modelfile(file_name=file_name, base=base, merged=merged, version=row.version, run=run)
        (tmp / "Modelfile").write_text(modelfile)
    path = Path(out).expanduser().absolute() / file_name
    log.info("exported v%d %s as GGUF (%s, %.1f MB) to %s", row.version, "merged" if merged else "adapter",
             outtype, path.stat().st_size / 1e6, path)
    return path


def stop_tokens(base: BaseModel) -> list[str]:
    """The end-of-sequence tokens (the tokenizer's and any the config adds, e.g. Llama 3's three)."""
    ids = [base.tokenizer.eos_token_id]
    configured = getattr(base.config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    tokens = [base.tokenizer.convert_ids_to_tokens(i) for i in dict.fromkeys(ids) if i is not None]
    return [t for t in tokens if t]


def render_modelfile(*, file_name: str, base: BaseModel, merged: bool, version: int, run: str) -> str:
    """An Ollama Modelfile. No TEMPLATE: the chat template is in the GGUF's metadata (or the base
    model's, for an adapter), which Ollama reads on `ollama create`; stop on the model's EOS."""
    lines = [f"# Ollama Modelfile for odpo v{version} (run {run}), trained on {base.spec}.",
             f"#   ollama create odpo-v{version} -f Modelfile && ollama run odpo-v{version}",
             "# No TEMPLATE: Ollama takes the chat template from the model's own metadata."]
    if merged:
        lines.append(f"FROM ./{file_name}")
    else:
        lines.append("# The adapter only fits the exact base model it was trained on:")
        if base.gguf is None and not Path(base.location).is_dir():
            lines.append(f"# {base.spec} is a Hugging Face id: point FROM at a local GGUF file or "
                         "safetensors directory of it.")
        lines += [f"FROM {base.gguf or base.location}", f"ADAPTER ./{file_name}"]
    lines += [f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}" for token in stop_tokens(base)]
    return "\n".join(lines) + "\n"
