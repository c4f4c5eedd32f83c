"""Imported at interpreter start-up when this folder is on PYTHONPATH: for a `python -m siren ...` subprocess of a test,
switches off the mechanism named in SIREN_TEST_DISABLE and injects the fault named in SIREN_TEST_FAULT
(see tests/mechanisms.py)."""

import os
import sys

if os.environ.get("SIREN_TEST_DISABLE") or os.environ.get("SIREN_TEST_FAULT"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import mechanisms

    if os.environ.get("SIREN_TEST_DISABLE"):
        mechanisms.disable(os.environ["SIREN_TEST_DISABLE"])
    if os.environ.get("SIREN_TEST_FAULT"):
        mechanisms.inject(os.environ["SIREN_TEST_FAULT"])
