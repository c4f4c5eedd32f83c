"""`codec` (baseline): train factorizer, quantizers, entropy model and decoder on frozen SSL features.

Loss = mel L1 through the decoder + commitment + entropy-model cross-entropy on detached codes.
"""

from __future__ import annotations

import torch
from torch import nn

from siren.config.stages import STAGE_SPECS
from siren.models.analysis import analyse, code_layout, entropy_rate, frame_mask, layout_bps, stream_codes, stream_masks
from siren.models.builders import build_component
from siren.models.roles import FrameGeometry
from siren.train.stages.base import Sample, Stage, StepOutput
from siren.train.stages.common import FrozenFeatures, masked_l1


class CodecStage(Stage):
    spec = STAGE_SPECS["codec"]

    def build(self) -> dict[str, nn.Module]:
        from siren.models.mel import MelSpectrogram

        a = self.cfg.audio
        self.mel = MelSpectrogram(a.sample_rate, a.n_mels, a.hop_length, a.n_fft, a.win_length, a.f_min, a.f_max)
        self.feats = FrozenFeatures(self.cfg)  # on the fly until `setup` attaches the feature cache
        ssl = build_component("ssl", self.cfg)
        mods = {"ssl": ssl}
        for n in self.components[1:]:
            mods[n] = build_component(n, self.cfg, ssl_dim=ssl.dim)
        self.geo = FrameGeometry.of(self.cfg.audio, mods["factorizer"])
        self._quantizers = {q: mods[q] for q in ("sem_quantizer", "pro_quantizer")}
        return mods

    def code_layout(self, modules):
        return code_layout(modules)

    def nominal_bps(self) -> float:
        return layout_bps(self.geo, self._quantizers)

    def setup(self, ctx, modules) -> None:
        self.feats.setup(ctx, modules["ssl"])

    def features(self, modules, wav: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return modules["ssl"](wav)

    def step(self, modules, batch) -> StepOutput:
        w = self.cfg.loss
        wav, lengths = batch["wav"], batch["lengths"]
        an = analyse(modules, self.feats(modules["ssl"], batch))
        mel_hat = modules["decoder"](an.sem.quantized, an.pro.quantized, an.spk.quantized)
        mel = self.mel.to(wav.device)(wav)[..., : mel_hat.shape[-1]]
        mel_mask = frame_mask(lengths, self.cfg.audio.hop_length, mel_hat.shape[-1])
        masks = stream_masks(lengths, an, self.geo)
        ent = modules["entropy_model"](
            {"sem": an.sem.codes.detach(), "pro": an.pro.codes.detach()},
            {"sem": masks["sem"].sum(1), "pro": masks["pro"].sum(1)},
        )
        terms = {
            "mel": masked_l1(mel_hat, mel, mel_mask),
            "commit": an.sem.commit_loss + an.pro.commit_loss + an.spk.commit_loss,
            "entropy": ent.loss,
        }
        loss = w.mel * terms["mel"] + w.commit * terms["commit"] + w.entropy * terms["entropy"]
        bits, seconds = entropy_rate(ent, masks, self.geo)
        return StepOutput(
            loss=loss,
            terms=terms,
            codes=stream_codes(an, masks),
            ratios={"rate/bps_entropy": (bits, seconds)},
        )

    def render(self, renderer, modules, utterances) -> list[Sample]:
        """Decoder-head mel → pipeline vocoder (if configured); the original audio and mels always."""
        from siren.train.samples import mel_of, pipeline_codec, synthesize

        codec = pipeline_codec(renderer, modules, features="ssl", flow=False)
        out = []
        for utt, wav in utterances:
            mel_hat, audio_out = synthesize(codec, wav)
            audio = {"original": wav}
            mels = {"original": mel_of(self, wav), "decoder": mel_hat[0]}
            if audio_out is not None:
                audio["decoder"] = audio_out[0]
            out.append(Sample(id=utt.id, audio=audio, mels=mels, paths={"decoder": codec.render_path}))
        return out
