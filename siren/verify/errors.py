"""Verify's error: anything that leaves `siren verify` without a verdict (exit 2)."""

from __future__ import annotations

from siren.errors import SirenError


class VerifyError(SirenError):
    pass
