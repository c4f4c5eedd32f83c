"""`flow`: train fuser + conditional flow matching on the frozen codes of a `codec` baseline (`baseline:` URI)."""

from __future__ import annotations

import torch
from torch import nn

from siren.checkpoints.lineage import (
    check_ssl_matches,
    checkpoint_fingerprint,
    checkpoint_record,
    verified_code_language,
)
from siren.checkpoints.load import load_checkpoint
from siren.config.stages import ANALYSIS_PARTS, STAGE_SPECS
from siren.errors import SirenError
from siren.models.analysis import analyse, code_layout, layout_bps, stream_codes, stream_masks
from siren.models.builders import build_component
from siren.models.roles import FrameGeometry
from siren.train.stages.base import Sample, Stage, StepOutput
from siren.train.stages.common import FrozenFeatures


class FlowStage(Stage):
    spec = STAGE_SPECS["flow"]

    def build(self) -> dict[str, nn.Module]:
        from siren.models.mel import MelSpectrogram

        if not self.cfg.baseline:
            raise SirenError("the flow stage needs `baseline:` — the URI of the codec checkpoint whose codes it reads")
        base = load_checkpoint(self.cfg.baseline, ["ssl", *ANALYSIS_PARTS, "entropy_model"], ssl_cfg_from=self.cfg)
        self.base_cfg = base.cfg
        self.baseline_uri, self.baseline_fingerprint = self.cfg.baseline, checkpoint_fingerprint(base.meta)
        self.consumed["baseline"] = checkpoint_record(self.cfg.baseline, base.path, base.meta)
        check_ssl_matches(self.cfg, base.meta, str(base.path))
        # The code language this flow learns to read (docs/sharing.md#lineage): the baseline's quantizers + entropy model.
        self.reads = verified_code_language(base.modules, base.meta, str(base.path))
        base.modules.pop("entropy_model")
        # Fuser/flow are built with the baseline's latent dims, so they read exactly its quantized latents.
        build_cfg = self.cfg
        for n in ANALYSIS_PARTS:  # and its checkpoints rebuild exactly the baseline's classes (foreign targets too)
            setattr(build_cfg, n, getattr(base.cfg, n))
        a = self.cfg.audio
        self.mel = MelSpectrogram(a.sample_rate, a.n_mels, a.hop_length, a.n_fft, a.win_length, a.f_min, a.f_max)
        self.feats = FrozenFeatures(self.cfg)  # on the fly until `setup` attaches the feature cache
        self.geo = FrameGeometry.of(self.cfg.audio, base.modules["factorizer"])
        self._quantizers = {q: base.modules[q] for q in ("sem_quantizer", "pro_quantizer")}
        return {
            **base.modules,
            "fuser": build_component("fuser", build_cfg),
            "flow": build_component("flow", build_cfg),
        }

    def code_layout(self, modules):
        return code_layout(modules)

    def code_language(self, modules) -> str:
        return self.reads

    def nominal_bps(self) -> float:
        return layout_bps(self.geo, self._quantizers)

    def setup(self, ctx, modules) -> None:
        self.feats.setup(ctx, modules["ssl"])

    def to_flow_domain(self, mel, flow):
        """The front end's mel in the flow's declared mel domain (exact conversion, or an error at the first step)."""
        from siren.models.mel import MelDomain, convert_mel, domain_of

        src = MelDomain.of_audio(self.cfg.audio)
        return convert_mel(mel, src, domain_of(flow, src), what="flow")

    def step(self, modules, batch) -> StepOutput:
        wav, lengths = batch["wav"], batch["lengths"]
        with torch.no_grad():
            an = analyse(modules, self.feats(modules["ssl"], batch))
        cond = modules["fuser"](an.sem.quantized, an.pro.quantized, an.spk.quantized)
        mel = self.mel.to(wav.device)(wav)[..., : cond.shape[1]]
        fm = modules["flow"].loss(self.to_flow_domain(mel, modules["flow"]), cond)
        masks = stream_masks(lengths, an, self.geo)
        return StepOutput(
            loss=self.cfg.loss.fm * fm,
            terms={"fm": fm},
            codes=stream_codes(an, masks),
        )

    def render(self, renderer, modules, utterances) -> list[Sample]:
        from siren.train.samples import mel_of, pipeline_codec, synthesize

        codec = pipeline_codec(renderer, modules, features="ssl")
        out = []
        for utt, wav in utterances:
            mel, audio = synthesize(codec, wav)
            s = Sample(
                id=utt.id,
                audio={"original": wav},
                mels={"original": mel_of(self, wav), "flow": mel[0]},
                paths={"flow": codec.render_path},
            )
            if audio is not None:
                s.audio["flow"] = audio[0]
            out.append(s)
        return out
