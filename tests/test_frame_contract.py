"""Frame counts are a contract: a student SSL whose frames do not line up one for one with the teacher's (e.g. a front
end padded to one frame more) is refused when the distill or adapt run is built, naming both counts, instead of
training one frame off and crashing `siren verify` later."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import stage_config
from torch import nn

from siren.errors import LayoutMismatch
from siren.models.frame_contract import check_frame_contract, frame_probe_lengths
from siren.models.ssl import SSLFeatureExtractor
from siren.models.student_ssl import TinyHubert
from siren.train.stages import make_stage

SR, HOP = 16000, 320


class PaddedStudent(nn.Module):
    """A TinyHubert whose front end pads one frame in front: one frame more than the teacher for every length, and
    it says so in `num_frames` (as a padded conv front end would)."""

    frame_rate = 50
    honest = True

    def __init__(self, teacher_dim: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.inner = TinyHubert.from_config(32, 2, 2, 64, 16, teacher_dim)

    @property
    def dim(self) -> int:
        return self.inner.dim

    def num_frames(self, num_samples: int) -> int:
        return self.inner.num_frames(num_samples) + (1 if self.honest else 0)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return F.pad(self.inner(wav), (0, 0, 1, 0))


class LyingStudent(PaddedStudent):
    """Pads one frame but declares the teacher's counts."""

    honest = False


class AlignedStudent(PaddedStudent):
    def num_frames(self, num_samples: int) -> int:
        return self.inner.num_frames(num_samples)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.inner(wav)


@pytest.fixture(scope="module")
def teacher(teacher_dir) -> SSLFeatureExtractor:
    return SSLFeatureExtractor.from_pretrained(str(teacher_dir), 3)


def test_padded_student_is_refused_naming_both_counts(teacher):
    n = frame_probe_lengths(SR, HOP)[0]
    a, b = PaddedStudent().num_frames(n), teacher.num_frames(n)
    assert a == b + 1
    with pytest.raises(
        LayoutMismatch, match=rf"student_ssl gives {a} frames for {n} samples .* teacher \(ssl\) gives {b}"
    ):
        check_frame_contract(PaddedStudent(), teacher, SR, HOP, "adapt")
    # num_frames that does not describe the output is refused too, naming both.
    got = LyingStudent()(torch.zeros(1, SR)).shape[1]
    with pytest.raises(
        LayoutMismatch, match=rf"declares num_frames\({SR}\) = {got - 1} but its forward pass gives {got}"
    ):
        check_frame_contract(LyingStudent(), teacher, SR, HOP, "adapt")
    check_frame_contract(AlignedStudent(), teacher, SR, HOP, "adapt")  # a matching student passes


def test_probe_leaves_training_flags_alone(teacher):
    s = AlignedStudent().train()
    before = [m.training for m in teacher.modules()]
    check_frame_contract(s, teacher, SR, HOP, "adapt")
    assert all(m.training for m in s.modules()) and [m.training for m in teacher.modules()] == before


def _distill_cfg(corpus_dir, teacher_dir, tmp_path, target: str):
    return stage_config("distill", corpus_dir, teacher_dir, tmp_path / "run", **{"student_ssl.target": target})


def test_distill_build_refuses_a_padded_student(corpus_dir, teacher_dir, tmp_path, monkeypatch):
    cfg = _distill_cfg(corpus_dir, teacher_dir, tmp_path, "test_frame_contract:PaddedStudent")
    with pytest.raises(LayoutMismatch, match="distill: student_ssl gives"):
        make_stage(cfg).build()
    ok = make_stage(_distill_cfg(corpus_dir, teacher_dir, tmp_path, "test_frame_contract:AlignedStudent")).build()
    assert set(ok) == {"ssl", "student_ssl"}
    # Negative control: without the check the padded student builds, and a distill step silently compares frames one
    # off (it cuts both to the shorter), which is what the refusal prevents.
    import siren.train.stages.distill as distill

    monkeypatch.setattr(distill, "check_frame_contract", lambda *a, **k: None)
    stage = make_stage(cfg)
    mods = stage.build()
    wav = torch.randn(2, SR) * 0.1
    out = stage.step(mods, {"wav": wav, "lengths": torch.tensor([SR, SR])})
    assert torch.isfinite(out.loss)


def test_adapt_build_refuses_a_padded_student(corpus_dir, teacher_dir, tmp_path, monkeypatch):
    from siren.train.trainer import Trainer

    Trainer(
        stage_config(
            "codec",
            corpus_dir,
            teacher_dir,
            tmp_path / "codec",
            **{"train.max_steps": 1, "train.checkpoint_every": 1, "samples.enabled": "false"},
        )
    ).fit()
    import siren.train.stages.adapt as adapt

    monkeypatch.setattr(adapt, "load_student", lambda cfg: (PaddedStudent(), {"uri": "padded"}))
    cfg = stage_config("adapt", corpus_dir, teacher_dir, tmp_path / "adapt", baseline=str(tmp_path / "codec"))
    with pytest.raises(LayoutMismatch, match=r"adapt: student_ssl gives (\d+) frames for \d+ samples but the teacher"):
        make_stage(cfg).build()
    monkeypatch.setattr(adapt, "load_student", lambda cfg: (AlignedStudent(), {"uri": "aligned"}))
    assert "student_ssl" in make_stage(cfg).build()


def test_stages_and_the_decoder_side_import_no_transformers():
    """Every stage class and the frame contract load without `transformers` (~3 s of a process's start): a vocoder
    run or a decode never builds a HuBERT, so it never imports one. A stage that imported `siren.models.ssl` at module
    level (as distill and adapt did for the contract) would fail this."""
    import subprocess
    import sys

    code = (
        "import sys; from siren.train.stages import stage_classes; stage_classes(); "
        "import siren.models.frame_contract, siren.codec, siren.verify; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')[:3])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout
