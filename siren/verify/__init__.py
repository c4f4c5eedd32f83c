"""`siren verify --run RUN --step N`: does the adapted checkpoint still speak the baseline's code language?

Loads `step_N` of an `adapt` run and the baseline named in its meta.json, runs both analysis paths on the eval set and
reports code agreement per stream/level, JS and entropy deltas, entropy-model and real-bitstream bit/s, and mel distances
of the full pipeline's output. Thresholds (`verify.thresholds`, `min/<metric>` or `max/<metric>`) decide pass/fail.
Exit code 0 = pass, 1 = fail, 2 = error (missing step, unresolvable baseline, layout mismatch, bad threshold).
`--wav FILE` judges one audio file instead of the eval set, with the same thresholds; its outputs go to
`RUN/verify/step_N/wav/<file stem>/`. The user's guide is docs/verify.md.

The package, one job a module:
- `load`: step N and its recorded baseline through `siren.checkpoints`, cross-checked; the eval set → a `Job`.
- `judge`: each rank's share encoded, decoded and scored; the reduction; the metrics, declared once (`declare`), which
  are also the names a threshold may use (`threshold_names`); the checks against the thresholds.
- `report`: report.json/.md/.html in a record of its own under `RUN/verify/step_N/`, the latest view, W&B.
- `run`: `run_verify` and `verify_cli`: the process group (`siren.ranks.Ranks`), signals and the exit code.
"""

from siren.verify.errors import VerifyError
from siren.verify.judge import threshold_names
from siren.verify.report import format_report, new_record_dir, publish_latest
from siren.verify.run import EXIT_ERROR, EXIT_FAIL, EXIT_PASS, run_verify, verify_cli

__all__ = [
    "run_verify",
    "verify_cli",
    "EXIT_PASS",
    "EXIT_FAIL",
    "EXIT_ERROR",
    "VerifyError",
    "threshold_names",
    "format_report",
    "new_record_dir",
    "publish_latest",
]
