"""Errors that are the user's to fix: the CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations


class SirenError(RuntimeError):
    """Base class for SIREN's own user-facing errors (bad run dir, frozen-weight violation, layout mismatch, ...)."""


class FrozenViolation(SirenError):
    """A frozen component's fingerprint changed: its weights or buffers moved although it is frozen."""


class LayoutMismatch(SirenError):
    """Two code layouts (streams, levels, codebook sizes) that must match do not."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from siren.artifacts import CheckpointNotFound
    from siren.config.loader import ConfigError
    from siren.data.audio import AudioError
    from siren.data.corpus import CorpusError
    from siren.data.manifest import ManifestError
    from siren.models.io import StrictLoadError

    return (
        SirenError,
        ConfigError,
        ManifestError,
        AudioError,
        CorpusError,
        CheckpointNotFound,
        StrictLoadError,
        FileNotFoundError,
    )


def __getattr__(name: str):
    if name == "USER_ERRORS":
        return _user_errors()
    raise AttributeError(name)
