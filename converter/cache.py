"""A small on-disk cache for what is slow to learn and the same for every adapter of a base.

Two kinds of entries, one JSON file each, under ``$CONVERTER_CACHE_DIR`` (default
``~/.cache/converter``):

- ``modelinfo/``: what the meta-device model tells about a base (module types, tied
  embeddings, checkpoint-key conversions), keyed by the base's config.json, its tensor
  names and the transformers version. A merge that finds it never imports transformers.
- ``sha256/``: the sha256 of a weight file for the receipt, keyed by the file's path,
  device, inode, size and modification time (the same identity the fingerprint uses).

Entries are written atomically (temp file + rename); an unreadable or stale entry is
ignored and rewritten. Set ``CONVERTER_CACHE_DIR=off`` to use no cache.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from converter.publish import fingerprint
from converter.publish import sha256_file as hash_file


def cache_dir() -> Path | None:
    """The cache's root, or None when ``CONVERTER_CACHE_DIR=off``."""
    value = os.environ.get("CONVERTER_CACHE_DIR")
    if value == "off":
        return None
    if value:
        return Path(value)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "converter"


def load(kind: str, key: str) -> dict | None:
    """A cached entry, or None when there is none (or it is unreadable)."""
    root = cache_dir()
    if root is None:
        return None
    try:
        return json.loads((root / kind / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None


def store(kind: str, key: str, value: dict) -> None:
    """Write an entry atomically; a cache that cannot be written is skipped."""
    root = cache_dir()
    if root is None:
        return
    try:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, folder / f"{key}.json")
    except OSError:  # a cache that cannot be written only costs time
        pass


def sha256_file(path: Path) -> str:
    """The file's sha256 (``publish.sha256_file``), from the cache when the file is unchanged since it was hashed."""
    path = Path(path)
    st = path.stat()
    key = fingerprint([str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns])
    hit = load("sha256", key)
    if hit and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = hash_file(path)
    store("sha256", key, {"path": str(path), "sha256": digest})
    return digest


@contextmanager
def hashing(paths: list[Path]) -> Iterator[dict[str, Future]]:
    """The sha256 of each file (``sha256_file``), computed in background threads while the block runs
    (hashlib releases the GIL: files hash in parallel); by file name."""
    pool = ThreadPoolExecutor(max(1, min(4, len(paths))))
    try:
        yield {p.name: pool.submit(sha256_file, p) for p in paths}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
