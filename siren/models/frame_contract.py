"""The frame contract between a student SSL model and its teacher: the same frames, one for one, for every input
length. Checked where a student meets a teacher (distill, adapt, verify); free of `transformers`, so a process that
never builds a HuBERT (a vocoder run, a decode) does not pay for importing it."""

from __future__ import annotations

import torch
from torch import nn

from siren.errors import LayoutMismatch


def frame_probe_lengths(sample_rate: int, hop: int) -> list[int]:
    """Input lengths at which two feature extractors' frame counts are compared: a few hops either side of a frame
    boundary, short (the shortest clips) to long (30 s)."""
    out = set()
    for k in (1, 2, 3, 8, 25, 50, 30 * sample_rate // hop):
        out |= {k * hop - 1, k * hop, k * hop + 1, k * hop + hop // 2}
    return sorted(n for n in out if n > 0)


def check_frame_contract(student: nn.Module, teacher: nn.Module, sample_rate: int, hop: int, where: str) -> None:
    """The student's features must be frame-for-frame the teacher's: the same `num_frames(n)` for every input length,
    and a forward pass that gives the frames `num_frames` promises. Raises LayoutMismatch naming both counts
    otherwise (a student whose front end pads one frame more would be compared one frame off, or crash verify)."""
    for n in frame_probe_lengths(sample_rate, hop):
        a, b = int(student.num_frames(n)), int(teacher.num_frames(n))
        if a != b:
            raise LayoutMismatch(
                f"{where}: student_ssl gives {a} frames for {n} samples but the teacher (ssl) gives {b}; the student's "
                "frames must match the teacher's one for one (check the student's conv front end and padding)"
            )
    n = sample_rate
    for name, m in (("student_ssl", student), ("ssl", teacher)):
        was = [x.training for x in m.modules()]
        m.eval()
        try:
            with torch.no_grad():
                p = next(m.parameters(), None)
                got = m(torch.zeros(1, n, device=p.device if p is not None else "cpu")).shape[1]
        finally:
            for x, t in zip(m.modules(), was, strict=True):
                x.training = t
        if got != m.num_frames(n):
            raise LayoutMismatch(
                f"{where}: {name} declares num_frames({n}) = {m.num_frames(n)} but its forward pass gives {got} "
                "frames; num_frames must describe the module's real output"
            )
