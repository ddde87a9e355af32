"""The GGUF conversion cache: a `.gguf` model is dequantized into a plain transformers checkpoint
once, and every later start of any odpo process loads that copy in about a second.

Its own module because it is file-system work with its own guarantees (atomic publish, one
converter at a time across processes), separate from choosing devices and loading weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CACHE_FORMAT = "1"


def gguf_cache_path(gguf: Path, cache_dir: Path) -> Path:
    """Where the converted copy of `gguf` lives; a new file (path, size or mtime) gets a new one."""
    st = gguf.stat()
    key = f"{CACHE_FORMAT}|{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return Path(cache_dir) / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into a transformers checkpoint (fp32 safetensors, tokenizer, template).

    fp32 because Q4_1 blocks dequantize to values (q*d + m) that bf16 cannot hold exactly, and an
    fp32 safetensors file is memory-mapped on load, so it is also the fastest to read back.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dequantized already; drop the GGUF marker so it saves plainly
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_chat_template(tokenizer, out_dir)


def _check_chat_template(source: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """The cached copy must render chats exactly as the GGUF's own template does."""
    if not source.chat_template:
        log.warning("%s has no chat template; chat prompts will need one", out_dir.name)
        return
    chat = [{"role": "user", "content": "ping"}]
    want = source.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    got = AutoTokenizer.from_pretrained(out_dir).apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    if got != want:
        raise RuntimeError(f"chat template did not survive conversion: {want!r} became {got!r}")


def ensure_gguf_cached(gguf: Path, cache_dir: Path) -> Path:
    """The converted checkpoint for `gguf`, converting it first if no process has yet.

    Written to a hidden .tmp directory and renamed into place, so other processes see either no
    cache or a complete one; a lock file makes concurrent first starts convert only once.
    """
    target = gguf_cache_path(gguf, cache_dir)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            started = time.perf_counter()
            log.info("converting %s to a transformers checkpoint (first use only)", gguf.name)
            convert_gguf(gguf, tmp)
            _finalize_tree(tmp)
            _publish(tmp, target)
            log.info("converted %s in %.1fs -> %s", gguf.name, time.perf_counter() - started, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish(tmp: Path, target: Path) -> None:
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        log.info("another process published %s first; using theirs", target)


def _finalize_tree(root: Path) -> None:
    """Make the cache readable like any checkpoint (mkdtemp creates it 0700, safetensors writes
    0600), and flush it before the rename publishes it, so a crash cannot publish holes."""
    o_directory = getattr(os, "O_DIRECTORY", None)
    for path in [*root.rglob("*"), root]:
        path.chmod(0o755 if path.is_dir() else 0o644)
        flags = os.O_RDONLY
        if path.is_dir():
            if o_directory is None:
                continue  # directories cannot be opened for fsync off POSIX
            flags |= o_directory
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone still keeps readers safe
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
