"""Our exception types. Each names the thing, the place and the fix."""

from __future__ import annotations


class ConverterError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class BadInputError(ConverterError):
    """Bad arguments or inputs, found before any work: exit status 2, nothing written.

    ``problems`` lists every problem found, so that one run reports them all.
    """

    exit_code = 2

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


class OutputExistsError(BadInputError):
    """The output exists with another fingerprint and --force was not given."""


class MergeError(ConverterError):
    """The merge itself failed (non-finite values, write errors, full disk)."""


class VerificationError(ConverterError):
    """The merged model is further from the unmerged one than the tolerance allows."""
