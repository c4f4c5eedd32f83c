"""Errors that are the user's to fix: the CLI prints them without a traceback and exits with code 2.

`SirenError` is the one root: every user-facing error SIREN raises derives from it (config, manifest, audio, corpus,
checkpoint, strict-load, lineage, bitstream, verify, eval, sweep errors), so one `except SirenError` catches them all.
Errors that are also a standard kind keep that base too (`ConfigError` is a `ValueError`, `CheckpointNotFound` a
`FileNotFoundError`).
"""

from __future__ import annotations


class SirenError(RuntimeError):
    """Base class for SIREN's own user-facing errors (bad run dir, frozen-weight violation, layout mismatch, ...)."""


class FrozenViolation(SirenError):
    """A frozen component's fingerprint changed: its weights or buffers moved although it is frozen."""


class LayoutMismatch(SirenError):
    """Two code layouts (streams, levels, codebook sizes) that must match do not."""


# What the command line prints as one `error:` line (exit code 2) instead of a traceback: every SIREN error, and a
# file the user named that does not exist.
USER_ERRORS: tuple[type[BaseException], ...] = (SirenError, FileNotFoundError)
