"""Our exception types. Each names the thing, the place and the fix."""

from __future__ import annotations

import errno
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class ConverterError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_FAILED


class BadInputError(ConverterError):
    """Bad arguments or inputs, found before any work: exit status 2, nothing written.

    ``problems`` lists every problem found, so that one run reports them all.
    """

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: str | list[str], *, hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hint = hint
        text = self.problems[0] if len(self.problems) == 1 else (
            f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        )
        if hint:
            text += f"\nFix: {hint}"
        super().__init__(text)


class AdapterMismatchError(BadInputError):
    """The adapter does not fit the base (keys, shapes, revision)."""


class UnsupportedAdapterError(BadInputError):
    """An adapter type or option that neither our engine nor PEFT can merge into weights."""


class UnsupportedBaseError(BadInputError):
    """A base whose stored tensors are not plain weights (quantized codes) and that we cannot decode."""


class OutputExistsError(BadInputError):
    """The output exists with another fingerprint and --force was not given."""


class UnsafeOutputError(BadInputError):
    """An output that would write into, over or around an input, a reserved path, or something not ours."""


class OutputLockedError(BadInputError):
    """Another converter process is writing this output right now."""


class MergeError(ConverterError):
    """The merge itself failed (non-finite values, write errors, full disk)."""


class VerificationError(ConverterError):
    """The merged model is further from the unmerged one than the tolerance allows."""


@dataclass(frozen=True)
class JobWarning:
    """Something a job should say but that does not fail it; ``code`` is what code matches on."""

    code: str  # "unchecked-revision" | "all-deltas-zero" | "some-deltas-zero" | "output-unchanged"
    message: str

    def __str__(self) -> str:
        return self.message


class Interrupted(BaseException):
    """SIGINT or SIGTERM: like KeyboardInterrupt, not caught by ``except Exception``, so every
    clean-up on the way out runs. ``exit_code`` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, exit_code: int = EXIT_SIGINT):
        self.exit_code = exit_code
        super().__init__("SIGTERM" if exit_code == EXIT_SIGTERM else "SIGINT")


@contextmanager
def sigterm_interrupts():
    """SIGTERM raises Interrupted(143) in the main thread while this is active, so every clean-up on the
    way out runs (``finally`` blocks, context managers), as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Interrupted(EXIT_SIGTERM)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_ignored():
    """SIGINT and SIGTERM ignored while a bounded clean-up runs: a second Ctrl-C must not cut it short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def interrupts_deferred():
    """A SIGINT or SIGTERM that comes while this block runs is raised when it ends, not inside it (a ledger
    record and its progress line are written whole, or not at all)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:  # delivered again, now that the handlers in force outside are back
        os.kill(os.getpid(), caught[0])


def write_failure(exc: OSError, doing: str, path=None) -> MergeError:
    """A failed write named for the user: what we were doing, where (``path``, else the error's own
    file name), and what to do about it."""
    where = f" {path or exc.filename}" if (path or exc.filename) else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return MergeError(f"no space left on the device while {doing}{where}. Nothing was published. "
                          "Fix: free some space, or choose an output location on another disk")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return MergeError(f"permission denied while {doing}{where}. Nothing was published. "
                          "Fix: check that you may write to the output location (owner, mode, mount)")
    if exc.errno == errno.EROFS:
        return MergeError(f"read-only file system while {doing}{where}. Nothing was published. "
                          "Fix: choose an output location on a writable file system")
    return MergeError(f"{doing}{where} failed: {exc.strerror or exc}. Nothing was published. "
                      "Fix: check the output location (free space, permissions, the disk itself)")


def read_failure(exc: OSError, what: str) -> BadInputError:
    """An input that cannot be read: bad input (exit 2), before any work."""
    where = exc.filename or what
    if exc.errno in (errno.EACCES, errno.EPERM):
        return BadInputError(f"permission denied reading {what} ({where})",
                             hint="check that you may read the base and adapter files")
    return BadInputError(f"cannot read {what} ({where}): {exc.strerror or exc}",
                         hint="check that the file is there and readable")
