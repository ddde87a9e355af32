"""GPU smoke: odpo's model-side work, each stage once, on one machine, with a table of its costs.

    python bench/gpu_smoke.py [--device cuda] [--model DIR] [--out FILE.json]     (a plain checkout)
    odpo bench gpu-smoke [same options]                                           (an installed odpo)

Stages (bench/gpu_smoke_stages.py): a LoRA DPO step (bf16 on a bf16 GPU), a 4-bit QLoRA DPO step
(bitsandbytes), the `hf` sampler (batched transformers generate, pairs/min), a hot reload (the
trained version copied into the live sampler model in place, swap ms) and the exports (adapter and
merged). The table gives seconds per step or call, peak GPU memory per stage, pairs/min and swap ms.

Why a script beside the benches: it has to run on a GPU machine with no internet where only torch,
transformers, peft and accelerate are sure to be installed. So it needs no web server, no database
and no pip install: when `odpo` is not importable it maps the checkout's folders onto the `odpo`
package the way pyproject.toml's package-dir does; it imports only the database-free trainer
modules (never odpo.db's SQLAlchemy half, gradio or vLLM); a stage whose dependency is missing
(bitsandbytes) is skipped with one printed reason, and a stage that fails does not stop the others.
Exit status: 0 when every stage is ok or skipped, 1 when one failed, 2 for unusable input.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

# pyproject.toml's [tool.setuptools] package-dir (tests/test_gpu_smoke.py checks they agree)
PACKAGE_DIRS = {"odpo": "odpo", "odpo.app": "app", "odpo.trainer": "trainer", "odpo.db": "db",
                "odpo.static": "static", "odpo.bench": "bench"}
NO_CUDA = "no CUDA device"
# (batch, max new tokens) by device: a GPU gets sizes that load it, a CPU (CI) small ones
SIZES = {"cuda": (8, 64), "cpu": (2, 16)}


class SetupError(Exception):
    """Input or environment that makes the whole smoke impossible (no model, bad --work-dir): one line."""


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds `odpo` and its subpackages in the checkout's top-level folders; their submodules are
    then found by the ordinary path finder through each package's __path__."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        folder = PACKAGE_DIRS.get(name)
        if folder is None:
            return None
        init = self.root / folder / "__init__.py"
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


def bootstrap_checkout_imports() -> None:
    """Make `import odpo...` work from a plain checkout; a no-op where odpo is installed.

    Also drops bench/ from the front of sys.path (Python puts a script's folder there): its
    cli.py, models.py, memory.py... would shadow any top-level module of the same name.
    """
    here = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0] or ".").resolve() == here:
        del sys.path[0]
    if importlib.util.find_spec("odpo") is None:
        sys.meta_path.append(_CheckoutFinder(here.parent))


def parse_args(argv: Optional[Sequence[str]], prog: str = "gpu_smoke.py") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when there is one, else print why not and exit 0), cuda, cuda:N or cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a bf16 GPU), bf16, fp16 or fp32")
    parser.add_argument("--model", default=None,
                        help="a converted checkpoint DIR (or a .gguf); default: the bundled SmolLM2-135M")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where a .gguf is converted to (default: <odpo data dir>/models)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON to this file")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep versions and exports here (new or empty); default: a temp dir, removed")
    parser.add_argument("--batch", type=_positive, default=None, help="pairs per DPO step and prompts per "
                        "sampling call [8 on CUDA, 2 on CPU]")
    parser.add_argument("--max-new-tokens", type=_positive, default=None,
                        help="sampled tokens per completion, and trained completion length [64 on CUDA, 16 on CPU]")
    parser.add_argument("--steps", type=_positive, default=3, help="DPO steps per training stage (first = warm-up)")
    parser.add_argument("--rounds", type=_positive, default=3, help="sampling calls (first = warm-up)")
    parser.add_argument("--swaps", type=_positive, default=5, help="hot swaps (first builds the key map)")
    parser.add_argument("--lr", type=float, default=1e-3, help="large enough that one step visibly moves the policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-model-dir", action="store_true",
                        help="convert the model if needed, print its checkpoint dir (to copy to a GPU machine), exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (and tracebacks of failures)")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def pick_device(requested: str, dtype: str) -> tuple[Optional[str], str]:
    """(device, "") to run on, or (None, the no-CUDA line) when auto finds no GPU. Checks --device
    and --dtype with odpo's own rules once, rather than failing every stage on them."""
    import torch

    if requested == "auto":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else f"CUDA {torch.version.cuda} build, but no GPU is visible")
            return None, (f"{NO_CUDA}: torch {torch.__version__} sees none ({why}); every GPU stage skipped "
                          "(--device cpu runs them on CPU)")
        requested = "cuda"
    if requested == "mps":
        raise SetupError("--device mps: this smoke runs on cuda, cuda:N or cpu")
    from odpo.trainer.policy.loading import pick_device_dtype  # imports transformers: not for the no-CUDA answer

    try:
        pick_device_dtype(requested, dtype)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    return requested, ""


def resolve_model(spec: Optional[str], cache_dir: Optional[Path]) -> Path:
    """A local checkpoint directory: --model as given, or the bundled GGUF converted (once, cached)."""
    from odpo.bench.gpu_smoke_stages import importable
    from odpo.db.settings import resolve_data_dir
    from odpo.trainer.options import DEFAULT_MODEL
    from odpo.trainer.policy.gguf_cache import ensure_gguf_cached, gguf_cache_path
    from odpo.trainer.policy.loading import ModelNotFoundError, resolve_model_spec

    try:
        source = resolve_model_spec(spec or DEFAULT_MODEL)
    except ModelNotFoundError as exc:
        raise SetupError(f"--model {spec}: {exc}" if spec else
                         f"no model: {exc}; or pass --model DIR (a converted checkpoint)") from None
    if source.kind == "dir":
        return Path(source.location)
    if source.kind == "hub":
        raise SetupError(f"--model {spec}: a hub id, but this smoke runs offline; pass a local checkpoint DIR")
    gguf, cache = Path(source.location), Path(cache_dir or resolve_data_dir() / "models")
    if not gguf_cache_path(gguf, cache).is_dir() and not importable("gguf"):
        raise SetupError(f"no model: converting {gguf.name} needs the gguf package, which is not installed; "
                         "pip install gguf, or pass --model DIR (a converted checkpoint, e.g. one printed by "
                         "`python bench/gpu_smoke.py --print-model-dir` on a machine that has gguf)")
    return ensure_gguf_cached(gguf, cache)


def _work_dir(requested: Optional[Path]) -> tuple[Path, bool]:
    """(the directory, whether to remove it at the end)."""
    if requested is None:
        return Path(tempfile.mkdtemp(prefix="odpo-gpu-smoke-")), True
    if requested.exists() and (not requested.is_dir() or any(requested.iterdir())):
        raise SetupError(f"--work-dir {requested} exists and is not an empty directory")
    requested.mkdir(parents=True, exist_ok=True)
    return requested.resolve(), False


def main(argv: Optional[Sequence[str]] = None, *, default_cache_dir: Optional[Path] = None,
         prog: str = "gpu_smoke.py") -> int:
    """Run the smoke; returns the exit status (see the module docstring)."""
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")  # a no-op where a handler exists
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub: fail fast instead
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from odpo.bench import gpu_smoke_stages as stages

    try:
        if args.print_model_dir:
            print(resolve_model(args.model, args.cache_dir or default_cache_dir))
            return 0
        device, no_cuda = pick_device(args.device, args.dtype)
        if device is None:
            print(no_cuda)
            _write_json(args.out, stages.skipped_report(no_cuda))
            return 0
        model_dir = resolve_model(args.model, args.cache_dir or default_cache_dir)
        work_dir, remove = _work_dir(args.work_dir)
    except SetupError as exc:
        print(f"gpu-smoke: {exc}", file=sys.stderr)
        return 2
    if not args.verbose:
        quiet_libraries()
    batch, tokens = SIZES["cuda" if device.startswith("cuda") else "cpu"]
    settings = stages.SmokeSettings(device=device, dtype=args.dtype, model_dir=model_dir, work_dir=work_dir,
                                    batch=args.batch or batch, max_new_tokens=args.max_new_tokens or tokens,
                                    steps=args.steps, rounds=args.rounds, swaps=args.swaps, lr=args.lr, seed=args.seed)
    try:
        report = stages.run_all(settings, announce=lambda line: print(line, flush=True))
    finally:
        if remove:
            shutil.rmtree(work_dir, ignore_errors=True)
    print()
    print(render_table(report))
    _write_json(args.out, report)
    return 1 if any(row["status"] == "failed" for row in report["stages"]) else 0


def render_table(report: dict[str, Any]) -> str:
    """The Markdown table printed at the end (and pasteable into an issue or the README)."""
    head = ["stage", "status", "s/step or call", "peak GPU MiB", "pairs/min", "swap ms", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["stages"]:
        cells = [r["title"], r["status"], _fmt(r["seconds"], ".3f"), _fmt(r["peak_gpu_mib"], ".0f"),
                 _fmt(r["pairs_per_min"], ".0f"), _fmt(r["swap_ms"], ".1f"), r["note"] or (r["reason"] or "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def quiet_libraries() -> None:
    """Loading bars, generation-config chatter and deprecation warnings are not the smoke's news.
    Process-wide, so only called once the stages are about to run (not on a setup error)."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _write_json(path: Optional[Path], report: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    bootstrap_checkout_imports()
    sys.exit(main())
