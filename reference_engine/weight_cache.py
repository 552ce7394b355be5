"""A disk cache of dequantized weights: SmolLM2's file is block-quantized, and turning its
blocks into float32 costs about 1.6 s of every process that loads it (a grading child, a
command, a lesson); reading the float32 tensors back costs a fraction of that.

Entries live in ~/.cache/inference-dojo/weights (or $DOJO_WEIGHT_CACHE; "off" disables
the cache), one safetensors file per model file and RoPE layout, named by a digest of the
file's path, size and modification time and of the loader's source: a changed file or a
changed loader never reads a stale entry. Writes go through a temporary file and an atomic
rename, so processes loading at once never read half a file; a cache that cannot be read
or written is skipped, never an error (the file itself is always the truth). The grader's
sandboxed children read entries but cannot write them (they write only in their own folder).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load, save_file  # imported here: a grading sandbox refuses late imports

MIN_FILE_BYTES = 32 << 20  # small files (the tests' tiny models) dequantize in milliseconds: not cached
MAX_ENTRIES = 6  # the least recently used go beyond this (an entry of SmolLM2 is 538 MB)
# read at import: a grading sandbox refuses to open the package's sources later; a new
# loader makes new entries
LOADER_DIGEST = hashlib.sha256(Path(__file__).with_name("gguf_loader.py").read_bytes()).hexdigest()


def cache_dir() -> Path | None:
    setting = os.environ.get("DOJO_WEIGHT_CACHE", "")
    if setting.lower() == "off":
        return None
    return Path(setting) if setting else Path.home() / ".cache" / "inference-dojo" / "weights"


def entry_path(gguf_path: str | os.PathLike, rope_layout: str, reader=None) -> Path | None:
    """Where the float32 weights of this file (in this layout) are cached, or None when
    it is not worth it (a small file, or one whose tensors are already float: the files
    `save_gguf` writes) or the cache is off."""
    folder = cache_dir()
    try:
        stat = os.stat(gguf_path)
    except OSError:
        return None
    if folder is None or stat.st_size < MIN_FILE_BYTES:
        return None
    if reader is not None and not any(t.tensor_type.name.startswith(("Q", "IQ")) for t in reader.tensors):
        return None
    key = f"{os.path.realpath(gguf_path)}|{stat.st_size}|{stat.st_mtime_ns}|{rope_layout}|{torch.__version__}"
    digest = hashlib.sha256(f"{key}|{LOADER_DIGEST}".encode()).hexdigest()[:20]
    return folder / f"{Path(gguf_path).stem}-{rope_layout}-{digest}.safetensors"


def read(entry: Path, expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor] | None:
    """The cached tensors (their own memory, writable), or None if absent or unreadable.
    `expected`: {name: shape} that the entry must hold exactly."""
    try:
        tensors = load(entry.read_bytes())
    except Exception:  # noqa: BLE001 (absent, truncated or foreign: the file is read instead)
        return None
    if expected is not None and {k: tuple(v.shape) for k, v in tensors.items()} != expected:
        return None
    try:
        os.utime(entry)  # recently used: evicted last
    except OSError:
        pass
    return tensors


def write(entry: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Store the tensors; any failure (read-only home, full disk) leaves no entry."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".partial-", suffix=".safetensors")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, entry)
        tmp = None
        entries = sorted(entry.parent.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[MAX_ENTRIES:]:
            old.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 (a cache: failing to write it costs only time)
        pass
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
