"""`distill`: train TinyHubert (`student_ssl`) to reproduce the teacher's configured layer (DistilHuBERT-style).

Loss = L1 + (1 − cosine similarity) between the student's head output and the teacher's hidden states, per frame.
Every checkpoint also holds the student as STEP/student (HuBERT `save_pretrained` dir + head), usable outside SIREN.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from siren.config.stages import STAGE_SPECS
from siren.errors import LayoutMismatch
from siren.models.analysis import frame_mask
from siren.models.builders import build_component
from siren.models.frame_contract import check_frame_contract
from siren.train.stages.base import Stage, StepOutput
from siren.train.stages.common import FrozenFeatures


class DistillStage(Stage):
    spec = STAGE_SPECS["distill"]

    def build(self) -> dict[str, nn.Module]:
        ssl = build_component("ssl", self.cfg)
        student = build_component("student_ssl", self.cfg)
        if student.dim != ssl.dim:
            raise LayoutMismatch(f"student_ssl.teacher_dim={student.dim} but the teacher's features are {ssl.dim}-d")
        a = self.cfg.audio
        check_frame_contract(student, ssl, a.sample_rate, a.hop_length, "distill")
        self.feats = FrozenFeatures(self.cfg)  # the teacher's layer on the fly, or cut from the feature cache
        return {"ssl": ssl, "student_ssl": student}

    def setup(self, ctx, modules) -> None:
        self.feats.setup(ctx, modules["ssl"])

    def export(self, step_dir, modules) -> None:
        """STEP/student: the student as `TinyHubert.save_pretrained` writes it; STEP/student/hubert is a plain
        `transformers.HubertModel.save_pretrained` dir, and `student_ssl.path` accepts STEP/student from anywhere."""
        modules["student_ssl"].save_pretrained(step_dir / "student")

    def step(self, modules, batch) -> StepOutput:
        wav, lengths = batch["wav"], batch["lengths"]
        target = self.feats(modules["ssl"], batch)
        pred = modules["student_ssl"](wav)
        T = min(pred.shape[1], target.shape[1])
        pred, target = pred[:, :T], target[:, :T]
        m = frame_mask(lengths, self.cfg.audio.hop_length, T).to(pred.dtype)
        denom = m.sum().clamp_min(1)
        l1 = ((pred - target).abs().mean(-1) * m).sum() / denom
        cos = (F.cosine_similarity(pred, target, dim=-1) * m).sum() / denom
        w = self.cfg.loss
        return StepOutput(loss=w.distill_l1 * l1 + w.distill_cos * (1 - cos), terms={"l1": l1, "cos": cos})
