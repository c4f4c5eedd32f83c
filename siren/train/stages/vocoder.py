"""`vocoder`: mel → waveform (Vocos-style), multi-resolution STFT + mel L1 (no GAN by default)."""

from __future__ import annotations

from torch import nn

from siren.config.stages import STAGE_SPECS
from siren.models.analysis import frame_mask
from siren.models.builders import build_component
from siren.train.stages.base import Sample, Stage, StepOutput
from siren.train.stages.common import masked_l1


class VocoderStage(Stage):
    spec = STAGE_SPECS["vocoder"]

    def build(self) -> dict[str, nn.Module]:
        from siren.models.mel import MelSpectrogram

        a = self.cfg.audio
        self.mel = MelSpectrogram(a.sample_rate, a.n_mels, a.hop_length, a.n_fft, a.win_length, a.f_min, a.f_max)
        return {"vocoder": build_component("vocoder", self.cfg)}

    def to_vocoder_domain(self, mel, vocoder):
        """The front end's mel in the vocoder's declared mel domain (exact conversion, or an error)."""
        from siren.models.mel import MelDomain, convert_mel, domain_of

        src = MelDomain.of_audio(self.cfg.audio)
        return convert_mel(mel, src, domain_of(vocoder, src), what="vocoder")

    def step(self, modules, batch) -> StepOutput:
        from siren.models.vocoder import multi_resolution_stft_loss

        wav, lengths = batch["wav"], batch["lengths"]
        mel_fn = self.mel.to(wav.device)
        mel = mel_fn(wav)
        wav_hat = modules["vocoder"](self.to_vocoder_domain(mel, modules["vocoder"]))
        n = min(wav_hat.shape[-1], wav.shape[-1])
        stft = multi_resolution_stft_loss(wav_hat[:, :n], wav[:, :n])
        mel_hat = mel_fn(wav_hat[:, :n])
        mel_l1 = masked_l1(
            mel_hat, mel[..., : mel_hat.shape[-1]], frame_mask(lengths, self.cfg.audio.hop_length, mel_hat.shape[-1])
        )
        w = self.cfg.loss
        return StepOutput(loss=w.stft * stft + w.mel * mel_l1, terms={"stft": stft, "mel": mel_l1})

    def render(self, renderer, modules, utterances) -> list[Sample]:
        from siren.train.samples import mel_of

        out = []
        for utt, wav in utterances:
            wav_hat = modules["vocoder"](self.to_vocoder_domain(mel_of(self, wav)[None], modules["vocoder"]))[0]
            out.append(
                Sample(
                    id=utt.id,
                    audio={"original": wav, "vocoded": wav_hat},
                    mels={"original": mel_of(self, wav), "vocoded": mel_of(self, wav_hat)},
                    paths={"vocoded": "mel-vocoder"},  # the original's mel through the vocoder being trained
                )
            )
        return out
