"""Exports: a PEFT adapter directory, a merged full model, and the preference dataset.

Nothing is ever half-written: directories are built in a hidden temp directory next to OUT and
renamed into place at the end (OUT may be missing or an empty directory, never a non-empty one);
dataset files are written next to OUT and renamed over it. Errors are ExportErrors, one line each.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from odpo.db import store
from odpo.db.engine import Database
from odpo.db.errors import OdpoError
from odpo.db.models import Adapter
from odpo.trainer.options import DEFAULT_MODEL
from odpo.trainer.policy.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINER_STATE, fsync_tree

log = logging.getLogger(__name__)

DATASET_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
# Inside a JSON document these can only be in strings, where the escape means the same character.
_LINE_BREAKS_IN_TEXT = {0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\u0085"}


class ExportError(OdpoError):
    """An export that cannot be done as asked (missing version, existing output, bad format)."""


# --- versions and base model -------------------------------------------------------------------

def resolve_version(db: Database, *, version: Optional[int], run: str = "default",
                    base_dir: Optional[Path] = None) -> tuple[Adapter, Path]:
    """The adapter row (latest committed when `version` is None) and its complete directory."""
    from odpo.trainer.policy.checkpoint import committed_dir_problem
    from odpo.trainer.sampling.hotreload import resolve_adapter_path

    if version == 0:
        raise ExportError("version 0 is the base model itself: there is no adapter to export")
    with db.sessions() as s:
        row = (store.latest_adapter(s, run=run) if version is None
               else store.get_adapter(s, version=version, run=run))
        known = ", ".join(f"v{a.version}" for a in store.list_versions(s, run=run)) or "none yet"
    if row is None:
        what = "no adapter version yet" if version is None else f"no adapter version v{version}"
        raise ExportError(f"{what} in run {run!r} (versions: {known}); train first with `odpo train`")
    path = resolve_adapter_path(row.path, base_dir)
    problem = committed_dir_problem(str(path))
    if problem:
        raise ExportError(f"adapter v{row.version} cannot be exported: {problem}")
    return row, path


def base_model_spec(adapter_dir: Path, override: Optional[str] = None) -> str:
    """The base model a version was trained on: --base-model, else the spec the trainer saved in
    trainer_state.json, else adapter_config.json's base_model_name_or_path."""
    if override:
        return override
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        spec = json.loads((Path(adapter_dir) / TRAINER_STATE).read_text())["hyperparameters"]["model"]
        if spec:
            return str(spec)
    with contextlib.suppress(OSError, ValueError, KeyError):
        name = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        if name:
            return str(name)
    raise ExportError(f"cannot tell which base model {adapter_dir} was trained on; pass --base-model")


# --- atomic outputs ----------------------------------------------------------------------------

@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temp directory next to `out`, renamed to `out` when the block succeeds, removed if not."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty directory; choose a new path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write next to {out}: {exc.strerror or exc}") from None
    try:
        yield tmp
        fsync_tree(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename cannot replace it everywhere
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(out: Path, *, overwrite: bool) -> Iterator[Path]:
    out = Path(out).expanduser().absolute()
    if out.is_dir():
        raise ExportError(f"{out} is a directory; give a file name ending in .jsonl or .parquet")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; use --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as exc:
        raise ExportError(f"cannot write next to {out}: {exc.strerror or exc}") from None
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- adapter and merged model ------------------------------------------------------------------

def _card_facts(db: Database, row: Adapter, *, run: str) -> dict[str, Any]:
    with db.sessions() as s:
        counts = store.trained_label_counts(s, version=row.version, run=run)
        evals = [e for e in store.list_evals(s, run=run) if e.version_a == row.version]
    return {"version": row.version, "run": run, "parent": row.parent, "step": row.step,
            "created_at": row.created_at, "metrics": dict(row.metrics or {}), "label_counts": counts,
            "evals": [{"vs": e.version_b, "judge": e.judge, "win_rate": e.win_rate, "ci_low": e.ci_low,
                       "ci_high": e.ci_high, "n": e.n} for e in evals]}


def export_adapter(db: Database, *, out: Path, version: Optional[int] = None, run: str = "default",
                   base_model: Optional[str] = None, base_dir: Optional[Path] = None) -> Path:
    """Write a PEFT adapter directory (adapter_config.json, adapter_model.safetensors, README.md)
    that PeftModel.from_pretrained and vLLM's LoRA loading accept; returns its path."""
    row, src = resolve_version(db, version=version, run=run, base_dir=base_dir)
    spec = base_model_spec(src, base_model)
    config = json.loads((src / ADAPTER_CONFIG).read_text())
    if base_model or not config.get("base_model_name_or_path"):
        config["base_model_name_or_path"] = spec
    facts = _card_facts(db, row, run=run)
    with staged_dir(out) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        shutil.copyfile(src / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
        (tmp / "README.md").write_text(render_model_card(kind="adapter", base_spec=spec, lora=config, **facts))
    log.info("exported adapter v%d to %s", row.version, out)
    return Path(out)


def export_merged(db: Database, *, out: Path, version: Optional[int] = None, run: str = "default",
                  base_model: Optional[str] = None, cache_dir: Optional[Path] = None,
                  base_dir: Optional[Path] = None) -> Path:
    """Write the base model with the version's LoRA merged in (fp32), plus tokenizer and chat
    template: a plain checkpoint for AutoModelForCausalLM.from_pretrained.

    The base is always reloaded at full precision, also for a version trained with --load-in-4bit:
    merging into dequantized NF4 weights would bake the quantization error into every weight of
    the export. W + BA on the original W is what a full-precision user of the adapter computes; it
    differs from the 4-bit policy that was sampled and trained by exactly that quantization error
    (README, "QLoRA on CPU and GPU")."""
    from peft import PeftModel

    from odpo.trainer.policy.loading import ModelConfig, load_model_and_tokenizer

    row, src = resolve_version(db, version=version, run=run, base_dir=base_dir)
    spec = base_model_spec(src, base_model)
    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise ExportError(f"{out} already exists and is not an empty directory; choose a new path")
    try:
        base, tokenizer = load_model_and_tokenizer(ModelConfig.for_spec(spec, cache_dir=cache_dir, device="cpu",
                                                                        dtype="fp32", load_in_4bit=False))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the base model {spec!r}: {exc}; pass --base-model") from None
    merged = PeftModel.from_pretrained(base, str(src)).merge_and_unload()
    lora = json.loads((src / ADAPTER_CONFIG).read_text())
    facts = _card_facts(db, row, run=run)
    with staged_dir(out) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(render_model_card(kind="merged", base_spec=spec, lora=lora, **facts))
    log.info("exported v%d merged into %s to %s", row.version, spec, out)
    return Path(out)


# --- dataset -----------------------------------------------------------------------------------

def _iso(value: Optional[dt.datetime]) -> Optional[str]:
    return None if value is None else value.isoformat(timespec="milliseconds")


def dataset_rows(db: Database, *, sources: str = "all", run: str = "default") -> list[dict[str, Any]]:
    """TRL's conversational preference format plus provenance columns, one row per label;
    `consumed_version` is the version of `run` that trained the label (None: not yet). A
    conversation's `prompt` holds all its turns, the earlier ones first, ending with the user
    message the two answers reply to (what `odpo import dataset` reads back as the same prompt)."""
    with db.sessions() as s:
        pairs = store.labeled_pairs(s, sources=sources, run=run)
    return [{"prompt": [*(p.context or []), {"role": "user", "content": p.prompt}],
             "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}],
             "label_id": p.label_id, "pair_id": p.pair_id, "prompt_id": p.prompt_id, "choice": p.choice,
             "labeler": p.labeler, "source": p.source, "judge_confidence": p.confidence,
             "adapter_version": p.pair_version, "shown_left": p.shown_left, "shown_at": _iso(p.shown_at),
             "answered_at": _iso(p.answered_at), "consumed_version": p.consumed_version} for p in pairs]


def jsonl_line(row: dict[str, Any]) -> str:
    """One JSONL line, UTF-8 kept readable, with U+2028, U+2029 and U+0085 escaped: they are legal
    raw inside JSON strings, but readers that split lines like str.splitlines() (and JavaScript
    before ES2019) cut a row there. Escaped, every reader reads the same text back."""
    return json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS_IN_TEXT) + "\n"


def export_dataset(db: Database, *, out: Path, sources: str = "all", overwrite: bool = False,
                   run: str = "default") -> int:
    """Write the labeled a/b pairs to OUT (.jsonl or .parquet); returns the number of rows.
    Loadable with datasets.load_dataset("json" | "parquet", data_files=OUT)."""
    fmt = DATASET_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise ExportError(f"cannot tell the format of {out}: use a .jsonl or .parquet file name")
    if sources not in store.LABEL_SOURCES:  # "all" = people and judges; "dataset" = imported files
        raise ExportError(f"unknown source {sources!r}; expected {', '.join(store.LABEL_SOURCES)}")
    rows = dataset_rows(db, sources=sources, run=run)
    if not rows:
        raise ExportError(f"no labeled a/b pairs from source {sources!r} to export yet")
    with staged_file(out, overwrite=overwrite) as tmp:
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(jsonl_line(row))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
    log.info("exported %d preference pairs (%s) to %s", len(rows), sources, out)
    return len(rows)


def export_for_ui(*, db: Database, fmt: str, out_dir: Path, run: str = "default",
                  base_dir: Optional[Path] = None) -> Path:
    """The admin tab's download, one file in `out_dir`: the dataset as .jsonl or .parquet, or
    ("hf"/"adapter") the latest adapter as a zip of its PEFT directory."""
    out_dir = Path(out_dir)
    if fmt in ("jsonl", "parquet"):
        path = out_dir / f"odpo-preferences.{fmt}"
        export_dataset(db, out=path, sources="all", run=run)
        return path
    if fmt in ("hf", "adapter"):
        row, _ = resolve_version(db, version=None, run=run, base_dir=base_dir)
        name = f"odpo-adapter-v{row.version}"
        export_adapter(db, out=out_dir / name, version=row.version, run=run, base_dir=base_dir)
        archive = shutil.make_archive(str(out_dir / name), "zip", root_dir=out_dir, base_dir=name)
        return Path(archive)
    raise ExportError(f"unknown export format {fmt!r}; expected jsonl, parquet or hf")


# --- model card --------------------------------------------------------------------------------

KNOWN_HUB_IDS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _hub_id(spec: str) -> Optional[str]:
    if spec in KNOWN_HUB_IDS:
        return KNOWN_HUB_IDS[spec]
    parts = spec.split("/")
    return spec if len(parts) == 2 and all(parts) and not Path(spec).exists() else None


def render_model_card(*, kind: str, base_spec: str, lora: dict[str, Any], version: int, run: str,
                      parent: Optional[int], step: int, created_at: Any, metrics: dict[str, Any],
                      label_counts: dict[str, int], evals: list[dict[str, Any]]) -> str:
    """README.md for an export: what it is, what it was trained on and how well it does."""
    hub = _hub_id(base_spec)
    front = ["---", f"library_name: {'peft' if kind == 'adapter' else 'transformers'}"]
    if hub:
        front.append(f"base_model: {hub}")
    front += ["tags: [odpo, dpo, online-dpo, lora]", "---", ""]
    what = ("LoRA adapter" if kind == "adapter"
            else "Model with a LoRA adapter merged into the base model's full-precision (fp32) weights")
    targets = lora.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
    lines = [f"# odpo {kind} v{version} (run {run})", "",
             f"{what}, trained with online DPO by odpo (a self-hosted Online DPO studio) on preference "
             "labels collected on the policy's own samples while it was being trained.", "",
             f"- Base model: `{base_spec}`" + (f" ({hub})" if hub and hub != base_spec else ""),
             f"- LoRA: r={lora.get('r')}, alpha={lora.get('lora_alpha')}, targets={targets}",
             f"- Version v{version} (parent v{parent or 0}), optimizer step {step}, created {created_at}", "",
             "## Data", ""]
    total = sum(label_counts.values())
    if total:
        lines += [f"{total} labels trained into this version and its ancestors:", ""]
        lines += [f"- {source}: {n}" for source, n in sorted(label_counts.items())] + [""]
    else:
        lines += ["No trained labels are recorded for this version.", ""]
    lines += ["## Metrics", ""]
    lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(metrics.items())]
    for e in evals:
        against = "base" if e["vs"] == 0 else f"v{e['vs']}"
        lines.append(f"- win rate vs {against} ({e['judge']}, n={e['n']}): {e['win_rate']:.3f} "
                     f"[{e['ci_low']:.3f}, {e['ci_high']:.3f}] (Wilson 95%, ties count half)")
    lines += ["", "## Use", "", "```python"]
    if kind == "adapter":
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                  f"base = AutoModelForCausalLM.from_pretrained({(hub or base_spec)!r})",
                  "model = PeftModel.from_pretrained(base, 'THIS_DIRECTORY')", "```", "",
                  "vLLM: `vllm serve BASE --enable-lora --lora-modules odpo=THIS_DIRECTORY`"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained('THIS_DIRECTORY')",
                  "tokenizer = AutoTokenizer.from_pretrained('THIS_DIRECTORY')", "```"]
    return "\n".join(front + lines) + "\n"
