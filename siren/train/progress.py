"""Rank-0 progress of a training run: a bar on a terminal, one status line every `train.status_every` steps otherwise.

The status line is also what `siren demo` reads from a stage's output to draw its own bar, so there is one progress
source. Format (stable, parsed by `parse_status`):
    siren: step 12/40 | loss 0.8123 | 2.31 steps/s | 18.5 s audio/s | ETA 0:00:12 | peak mem 1.20 GiB
"""

from __future__ import annotations

import datetime
import re
import sys
import time
from typing import TextIO

import torch

STATUS_RE = re.compile(r"^siren: step (\d+)/(\d+) \| loss (\S+)")


def parse_status(line: str) -> tuple[int, int, float] | None:
    """(step, total, loss) from a status line, or None for any other line."""
    m = STATUS_RE.match(line.strip())
    if not m:
        return None
    try:
        loss = float(m.group(3))
    except ValueError:
        loss = float("nan")
    return int(m.group(1)), int(m.group(2)), loss


class Progress:
    def __init__(
        self,
        total: int,
        start: int,
        status_every: int,
        enabled: bool,
        device: torch.device,
        stream: TextIO | None = None,
    ):
        self.total, self.start, self.every, self.enabled = total, start, max(1, status_every), enabled
        self.device, self.stream = device, stream or sys.stderr
        self._t0 = time.perf_counter()
        self._audio = 0.0
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train", file=self.stream, dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """After step `step` (1-based global step) with its reduced metrics (`data/audio_seconds` summed over ranks)."""
        if not self.enabled:
            return
        self._audio += metrics.get("data/audio_seconds", 0.0)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        done = step - self.start
        rate = done / elapsed
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        fields = {
            "loss": f"{metrics.get('train/loss', float('nan')):.4f}",
            "steps/s": f"{rate:.2f}",
            "audio s/s": f"{self._audio / elapsed:.1f}",
            "ETA": _fmt_eta(eta),
        }
        mem = peak_memory_gib(self.device)
        if mem is not None:
            fields["peak mem"] = f"{mem:.2f} GiB"
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(fields, refresh=True)
            return
        if step % self.every == 0 or step == self.total:
            line = (
                f"siren: step {step}/{self.total} | loss {fields['loss']} | {fields['steps/s']} steps/s | "
                f"{fields['audio s/s']} s audio/s | ETA {fields['ETA']}"
            )
            if mem is not None:
                line += f" | peak mem {mem:.2f} GiB"
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak accelerator memory allocated by this process, or None on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def _fmt_eta(seconds: float) -> str:
    if seconds == float("inf") or seconds != seconds:
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))
