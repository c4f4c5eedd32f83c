"""Mel images at a checkpoint: siren's writer (Pillow) ÷ the same images drawn with matplotlib, as whole processes.

A short run pays its checkpoint's images once per process: the drawing library's import, then one image per sample
variant. So the figure is whole processes, each importing torch, then the writer, then saving `--images` PNGs of
the same mel (80 bins × 150 frames, 3 s at 50 Hz). The two take turns (A B A B ...), `--repeats` pairs; the median
of the pairwise ratios of CPU time and of wall time is reported, with the writing part of each process on its own
(the process minus its torch import). The matplotlib reference is the writer SIREN used before (a bare Figure on the
Agg canvas with fixed margins, no pyplot), kept here only to measure against.

    python benchmarks/bench_samples.py [--repeats 7] [--images 8] [--write]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROCESS = r"""
import json, resource, sys, time
from pathlib import Path

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

import torch

out, kind, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
mel = torch.linspace(-11.5, 2.0, 80 * 150).reshape(80, 150)
c0, t0 = cpu(), time.perf_counter()
if kind == "siren":
    from siren.train.samples import save_mel_png
else:
    from matplotlib.figure import Figure

    def save_mel_png(path, mel, title):
        fig = Figure(figsize=(6, 2.4), dpi=80)
        ax = fig.add_axes((0.1, 0.2, 0.88, 0.7))
        ax.imshow(mel.numpy(), origin="lower", aspect="auto", vmin=-11.5, vmax=2.0)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("frame", fontsize=7)
        ax.set_ylabel("mel bin", fontsize=7)
        fig.savefig(path)

for i in range(n):
    save_mel_png(out / f"{kind}_{i}.png", mel, f"utt{i:04d} adapted [flow-vocoder] (step 2)")
print(json.dumps({"write_cpu": cpu() - c0, "write_wall": time.perf_counter() - t0}))
"""


def _one(kind: str, images: int, work: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", PROCESS, str(work), kind, str(images)], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} process failed:\n{r.stderr[-2000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"cpu": cpu, "wall": wall, **json.loads(r.stdout.strip().splitlines()[-1])}


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def run(repeats: int, images: int) -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory(prefix="siren-bench-samples-") as tmp:
        work = Path(tmp)
        _one("siren", images, work), _one("matplotlib", images, work)  # warm the page cache
        pairs = [(_one("siren", images, work), _one("matplotlib", images, work)) for _ in range(repeats)]
    rows = []
    for key, what in (("cpu", "CPU"), ("wall", "wall")):
        ratios = [a[key] / b[key] for a, b in pairs]
        rows.append(
            (
                f"process saving {images} mel PNGs, {what} time: siren ÷ matplotlib (median of {repeats} pairs, "
                f"range {min(ratios):.2f}–{max(ratios):.2f})",
                f"{_median(ratios):.2f}",
                "< 1",
            )
        )
    for key, what in (("write_cpu", "CPU"), ("write_wall", "wall")):
        a, b = _median([p[0][key] for p in pairs]), _median([p[1][key] for p in pairs])
        rows.append(
            (
                f"the writing alone (library import + {images} images), {what} s: siren / matplotlib (medians)",
                f"{a:.3f} / {b:.3f}",
                "",
            )
        )
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--images", type=int, default=8, help="images per process (a checkpoint's samples)")
    ap.add_argument("--write", action="store_true", help="insert the figures as a section of BENCHMARKS.md")
    args = ap.parse_args()
    rows = run(args.repeats, args.images)
    if args.write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from common import write_section

        cmd = f"Command: `python benchmarks/bench_samples.py --repeats {args.repeats} --images {args.images} --write`."
        write_section(rows, "mel images at a checkpoint", cmd)
    else:
        for a, b, c in rows:
            print(f"| {a} | {b} | {c} |")
