"""The package's exception hierarchy.

Every failure the library can foresee is one of these; the CLI turns them into
one line on stderr and exit status 2 (bad input) or 1 (verification failed).
"""

from __future__ import annotations


class PvpatchError(Exception):
    """Base class of every error pvpatch raises on purpose."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def __reduce__(self) -> tuple[type[PvpatchError], tuple[str, str | None]]:
        # Errors cross process boundaries (worker pools): keep the path, which the
        # default pickling (args only) would drop.
        return (type(self), (self.message, self.path))


class InputError(PvpatchError):
    """The input cannot be used: missing, unreadable, or not a supported ELF file."""


class ElfFormatError(InputError):
    """The file claims to be ELF but its structure is inconsistent or truncated."""


class TableError(InputError):
    """The `.parainstructions` table cannot be decoded with any known layout."""


class ArchMismatch(InputError):
    """An option (an op catalog, a backend spec) is for another architecture than this
    file: over a mixed tree only that file fails, the others are still processed."""


class OpsError(InputError):
    """An op-name source (BTF, DWARF, catalog) cannot be read or does not fit."""


class SpecError(InputError):
    """A backend spec file is invalid (unknown key, action, register, bad asm...)."""


class UsageError(PvpatchError):
    """The request is inconsistent (bad option combination, -o equal to input...)."""


class OutputError(PvpatchError):
    """The output cannot be written (no such folder, no space left, input changed...)."""


class RewriteError(PvpatchError):
    """A plan cannot be applied to the file."""


class VerifyError(PvpatchError):
    """Emulation showed that a rewritten site breaks its contract."""
