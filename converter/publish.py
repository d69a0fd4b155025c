"""Everything around the weights, and putting an output in place: companion files, config.json,
fingerprints, the receipt and card written with it, staging, one writer per output, atomic publish."""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from converter.errors import OutputLockedError, write_failure
from converter.receipt import RECEIPT, Receipt, Variant, model_card, variant_card

PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".partial.old"  # a replaced output, where the file system cannot exchange two directories
# Base files that are weights or that we write ourselves.
SKIP_BASE = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md", RECEIPT, ".gitattributes",
             "config.json"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja",
                   "chat_template.json", "sentencepiece.bpe.model")


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    """The file's sha256, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(parts: dict) -> str:
    """The sha256 of ``parts`` as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(path: Path) -> dict:
    """A file's name, size and modification time (how a local base file is known)."""
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def copy_companions(src_dir: Path, out_dir: Path, skip_existing: bool = False) -> list[str]:
    """Copy everything of ``src_dir`` but weights and the files we write ourselves (tokenizer, generation config,
    templates, sentence-transformers modules...); returns the relative paths copied."""
    kept = []
    for src in sorted(src_dir.rglob("*")):
        rel = src.relative_to(src_dir)
        if any(part.startswith(".") for part in rel.parts) or not src.is_file() or rel.name.endswith(WEIGHT_SUFFIXES):
            continue  # weights here, and weights of sub-models we do not merge
        if len(rel.parts) == 1 and (rel.name in SKIP_BASE or (skip_existing and (out_dir / rel).exists())):
            continue
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        kept.append(str(rel))
    return kept


def copy_non_weight_files(base_dir: Path, adapter_dirs: list[Path], out_dir: Path) -> list[str]:
    """The base's companions (``copy_companions``), then the tokenizer files the adapters ship, which win (in a
    stack, the last adapter's that ships one); returns the relative paths copied."""
    kept = copy_companions(base_dir, out_dir)
    source = tokenizer_source(base_dir, adapter_dirs)
    for name in TOKENIZER_FILES if source != base_dir else ():
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)
            if name not in kept:
                kept.append(name)
    return kept


def tokenizer_source(base_dir: Path, adapter_dirs: list[Path]) -> Path:
    """Where the output's tokenizer files come from: the last adapter that ships any, else the base."""
    shipping = [d for d in adapter_dirs if any((d / name).is_file() for name in TOKENIZER_FILES)]
    return shipping[-1] if shipping else base_dir


QUANTIZATION_KEYS = ("quantization_config", "compression_config")


def write_config(config: dict, out_dir: Path, dtype_name: str, vocab_size: int | None, untie: bool,
                 quantization_config: dict | None = None, task: dict | None = None) -> dict:
    """Write config.json true to the merged weights (dtype, vocab_size, tie_word_embeddings, quantization_config:
    the base's only where the output keeps its format); returns it."""
    config = json.loads(json.dumps(config))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    for scope in (config, text or {}):  # the weights are dense: a quantized base's codes were decoded
        for key in QUANTIZATION_KEYS:
            scope.pop(key, None)
    if quantization_config is not None:  # --keep-quantization: stored in the base's own format
        config["quantization_config"] = quantization_config
    if task is not None:  # a task head the adapter added: its class, num_labels and labels
        config.update(task)
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[key] = dtype_name
    if text is not None and ("dtype" in text or "torch_dtype" in text):
        text["dtype" if "dtype" in text else "torch_dtype"] = dtype_name
    if vocab_size is not None:
        for scope in (config, text):
            if scope is not None and "vocab_size" in scope:
                scope["vocab_size"] = vocab_size
        if "vocab_size" not in config and (text is None or "vocab_size" not in text):
            config["vocab_size"] = vocab_size
    if untie:
        config["tie_word_embeddings"] = False
        if text is not None and "tie_word_embeddings" in text:
            text["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def is_done(out: Path, fingerprint: str) -> bool:
    """Whether ``out`` holds a finished conversion of exactly these inputs and options."""
    receipt = read_receipt(out)
    return receipt is not None and receipt["fingerprint"] == fingerprint and receipt.get("status") == "succeeded"


def read_receipt(out_dir: Path) -> dict | None:
    """The receipt of a directory this tool wrote, or None (no receipt, or not one of ours)."""
    try:
        receipt = json.loads((out_dir / RECEIPT).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return receipt if isinstance(receipt, dict) and isinstance(receipt.get("fingerprint"), str) else None


def fsync_dir(path: Path) -> None:
    """Sync a directory's entries to disk (after a rename in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_job(receipt: Receipt, partial: Path, out: Path,
                variants: list[tuple[Variant, Path, tuple[str, str]]]) -> None:
    """Cards and receipts written, each variant then the merged output renamed into place: the merged
    output's receipt, last, is the one "done" marker of the job. ``variants``: (record, directory, (card tag,
    what loading it needs)). A variant never outlives a job that fails here."""
    published: list[Path] = []
    try:
        write_card_and_receipt(partial, model_card(receipt), receipt)
        for variant, vdir, (tag, loads_with) in variants:
            write_card_and_receipt(partial_dir(vdir), variant_card(receipt, variant, out.name, tag, loads_with),
                                   receipt.for_variant(variant, out))
            swap_in(partial_dir(vdir), vdir)
            published.append(vdir)
        swap_in(partial, out)
    except BaseException:
        for vdir in published:
            shutil.rmtree(vdir, ignore_errors=True)
        raise


def write_card_and_receipt(directory: Path, card: str, receipt: Receipt) -> None:
    """README.md and conversion.json into ``directory``, synced."""
    try:
        (directory / "README.md").write_text(card)
        (directory / RECEIPT).write_text(json.dumps(receipt.to_json(), indent=2, default=str) + "\n")
        fsync_dir(directory)
    except OSError as exc:
        raise write_failure(exc, "writing the receipt") from None


# ---------------------------------------------------------------------------------------------------------------------
# Staging and atomic publish: <out>.partial is written, then exchanged with <out> in one step.
# ---------------------------------------------------------------------------------------------------------------------

def partial_dir(out: Path) -> Path:
    """``<out>.partial``, where an output is staged."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def lock_path(out: Path) -> Path:
    """The lock file beside ``out`` (hidden)."""
    return out.with_name(f".{out.name}.converter-lock")


def replaced_dir(out: Path) -> Path:
    """Where a previous output waits to be removed, on file systems that cannot exchange two directories."""
    return out.with_name(out.name + REPLACED_SUFFIX)


def staging_paths(out: Path) -> list[Path]:
    """Paths beside ``out`` that publishing it creates and removes."""
    return [partial_dir(out), replaced_dir(out), lock_path(out)]


def fresh_dir(partial: Path) -> Path:
    """An empty staging directory; one left by a crashed run is never taken as done."""
    try:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    except OSError as exc:
        raise write_failure(exc, "creating the staging directory") from None
    return partial


def remove_leftovers(out: Path) -> list[Path]:
    """Remove what an unfinished publish of ``out`` left (its staging directory, a replaced output);
    the caller holds ``out``'s lock. Returns what was removed."""
    removed = []
    for path in (partial_dir(out), replaced_dir(out)):
        if path.exists():
            shutil.rmtree(path)
            removed.append(path)
    return removed


def swap_in(partial: Path, out: Path) -> None:
    """The last step: ``<out>.partial`` becomes ``<out>``. A previous output is exchanged with it in one
    atomic step where the file system can (then removed); nothing is ever left under another name."""
    if out.exists() and _exchange(partial, out):
        fsync_dir(out.parent)
        shutil.rmtree(partial, ignore_errors=True)  # now the previous output; a leftover .partial if this fails
        return
    replaced = None
    if out.exists():
        replaced = replaced_dir(out)
        if replaced.exists():
            shutil.rmtree(replaced)
        out.rename(replaced)
    partial.rename(out)
    fsync_dir(out.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def output_lock(out: Path):
    """One writer per output: a second one (another ``converter merge`` or run on this output) is refused,
    naming the holder."""
    return exclusive(lock_path(out), lambda holder: OutputLockedError(
        f"output {out} is being written by another converter process ({holder})",
        hint="wait for it to finish, or choose another --output"))


@contextmanager
def exclusive(path: Path, refusal: Callable[[str], Exception]):
    """Hold the lock file ``path`` while the block runs; when another process holds it, raise ``refusal(holder)``.
    The lock dies with its process; its file is removed when released."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path)
    except OSError as exc:
        raise write_failure(exc, "creating the lock file") from None
    if fd is None:
        raise refusal(_read_holder(path))
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {dt.datetime.now():%Y-%m-%d %H:%M:%S}"
                 .encode())
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        os.close(fd)  # closing releases the lock


def _acquire(path: Path) -> int | None:
    """A locked descriptor of ``path``, or None when another process holds it. A file unlinked by its
    previous holder between our open and our lock is not ours: try again on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _read_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"
