"""One exception hierarchy for everything moe-pack reports to a user.

Every error carries a one-line message naming the file, tensor or option at fault, and an
optional hint saying what to do. The CLIs print ``error: <message>`` and ``hint: <hint>``
and exit non-zero; they never show a traceback for a MoepackError.
"""

from __future__ import annotations


class MoepackError(Exception):
    """Base class: a problem a user can act on."""

    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class FormatError(MoepackError):
    """A .moepack file breaks a rule of docs/FORMAT.md."""

    hint = "the file is damaged or was not written by moe-pack; re-create it with `moe-pack quantize`"


class BadMagicError(FormatError):
    """The file does not start with the .moepack magic."""

    hint = "pass a file written by `moe-pack quantize`"


class UnsupportedVersionError(FormatError):
    """The format version is not one this reader understands."""

    hint = "upgrade moe-pack, or re-create the file with this version"


class TruncatedFileError(FormatError):
    """The file is shorter than its header says."""

    hint = "the file is incomplete (interrupted copy or download?); copy it again"


class HeaderError(FormatError):
    """The JSON header is malformed or breaks the schema."""


class LayoutError(FormatError):
    """A byte range is misaligned, out of bounds, overlapping or of the wrong size."""


class ChecksumError(FormatError):
    """A record's bytes do not match its crc32."""

    hint = "the file is corrupted; copy or re-create it"


class ConfigError(MoepackError):
    """An option or configuration value is out of range."""


class SourceError(MoepackError):
    """The input checkpoint cannot be used (missing file, wrong architecture, bad tensor)."""
