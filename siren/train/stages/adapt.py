"""`adapt`: retrain the factorizer on student (TinyHubert) features under a frozen decoder, quantizers and entropy model.

This is the seed guide's constrained adaptation. The baseline (`baseline:` URI, a `codec` checkpoint) provides the
factorizer's starting weights, the frozen quantizers/entropy model/decoder, and the teacher path (`ssl` + baseline
factorizer) whose latents and codes are cached once per baseline fingerprint. Loss = mel L1 through the frozen decoder
+ latent match to the teacher's pre-quantization latents + code agreement (student's quantized values vs the teacher
codes' values, through the frozen quantizers). The frozen entropy model scores the student's codes (logged as bit/s and drift); codes are discrete, so it is not a gradient path.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from siren.checkpoints.layout import RunDir
from siren.checkpoints.lineage import (
    check_ssl_matches,
    checkpoint_fingerprint,
    checkpoint_record,
    verified_code_language,
)
from siren.checkpoints.load import load_checkpoint
from siren.config.stages import CODEC_PARTS, STAGE_SPECS
from siren.errors import LayoutMismatch, SirenError
from siren.models.analysis import analyse, code_layout, entropy_rate, frame_mask, layout_bps, stream_codes, stream_masks
from siren.models.frame_contract import check_frame_contract
from siren.models.roles import FrameGeometry
from siren.train.stages.base import Sample, Stage, StepOutput
from siren.train.stages.common import masked_l1, masked_mse

log = logging.getLogger("siren")


def load_student(cfg) -> tuple[nn.Module, dict]:
    """`student_ssl.path`: a `save_pretrained` TinyHubert dir, or a checkpoint URI of a `distill` run.
    Returns the student and its lineage record (resolved path and fingerprint)."""
    from siren.models.io import fingerprint
    from siren.models.student_ssl import TinyHubert

    path = cfg.student_ssl.path
    if not path:
        raise SirenError("adapt needs student_ssl.path: a distill run (runs/.../distill) or a saved TinyHubert dir")
    p = Path(path)
    source = None
    if p.is_dir() and (p / "hubert").is_dir():
        student = TinyHubert.from_pretrained(p)
        record = {"uri": str(path), "path": str(p.resolve()), "fingerprint": fingerprint(student), "stage": None}
    else:  # a distill run, SIREN-trained or imported (`siren import --stage distill` of a foreign student)
        ck = load_checkpoint(path, ["student_ssl"])
        student = ck.modules["student_ssl"]
        record = checkpoint_record(path, ck.path, ck.meta)
        source = ck.cfg.student_ssl
    describe_student(cfg, student, source)
    return student, record


def describe_student(cfg, student, source=None) -> None:
    """Record the loaded student's real architecture in the run's config, so its checkpoints rebuild it exactly: a
    foreign student (its checkpoint's `student_ssl.target`) keeps its class, args and adapter; a TinyHubert its sizes."""
    s = cfg.student_ssl
    if source is not None and source.target:
        s.target, s.args = source.target, dict(source.args)
        s.adapter, s.adapter_args = source.adapter, dict(source.adapter_args)
        s.weights, s.weights_key, s.rename = None, None, {}  # the checkpoint holds the weights
        s.allow_missing, s.allow_unexpected = [], []
        return
    hubert = getattr(student, "hubert", None)
    if hubert is None:
        raise SirenError(
            f"student_ssl is a {type(student).__module__}.{type(student).__name__} without a recorded target: "
            "import a foreign student with `siren import --stage distill` (student_ssl.target + weights) and point "
            "student_ssl.path at that run"
        )
    hc = hubert.config
    s.hidden_size, s.num_layers, s.num_heads = hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads
    s.intermediate_size, s.conv_dim, s.teacher_dim = hc.intermediate_size, hc.conv_dim[0], student.dim


class AdaptStage(Stage):
    spec = STAGE_SPECS["adapt"]

    def build(self) -> dict[str, nn.Module]:
        from siren.models.mel import MelSpectrogram

        if not self.cfg.baseline:
            raise SirenError("adapt needs `baseline:` — the URI of a codec checkpoint (run dir, step dir or wandb:...)")
        base = load_checkpoint(self.cfg.baseline, ["ssl", *CODEC_PARTS], ssl_cfg_from=self.cfg)
        self.base_cfg = base.cfg
        self.baseline_uri = self.cfg.baseline
        self.baseline_fingerprint = checkpoint_fingerprint(base.meta)
        self.consumed["baseline"] = checkpoint_record(self.cfg.baseline, base.path, base.meta)
        check_ssl_matches(self.cfg, base.meta, str(base.path))
        self.baseline_language = verified_code_language(base.modules, base.meta, str(base.path))
        if base.meta.stage != "codec":
            raise SirenError(f"baseline {base.path} is a {base.meta.stage!r} checkpoint; adapt needs a codec one")
        # The adapted checkpoint must rebuild exactly the baseline's classes (foreign targets included).
        for n in CODEC_PARTS:
            setattr(self.cfg, n, getattr(base.cfg, n))
        student, self.consumed["student_ssl"] = load_student(self.cfg)
        fact = base.modules["factorizer"]
        in_dim = fact.input_dim
        if student.dim != in_dim:
            raise LayoutMismatch(
                f"student_ssl outputs {student.dim}-d features but the baseline factorizer takes {in_dim}"
            )
        a = self.cfg.audio
        check_frame_contract(student, base.modules["ssl"], a.sample_rate, a.hop_length, "adapt")
        self.mel = MelSpectrogram(a.sample_rate, a.n_mels, a.hop_length, a.n_fft, a.win_length, a.f_min, a.f_max)
        self.geo = FrameGeometry.of(a, fact)
        self._quantizers = {q: base.modules[q] for q in ("sem_quantizer", "pro_quantizer")}
        mods = {
            "ssl": base.modules["ssl"],
            "student_ssl": student,
            "teacher_factorizer": fact,
            "factorizer": copy.deepcopy(fact),
        }  # the student side starts from the baseline's weights
        for n in CODEC_PARTS[1:]:
            mods[n] = base.modules[n]
        return mods

    def code_layout(self, modules):
        return code_layout(modules)

    def nominal_bps(self) -> float:
        return layout_bps(self.geo, self._quantizers)

    # The two analysis paths ------------------------------------------------------------------------------------------
    def teacher(self, modules, wav: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher path (ssl → baseline factorizer → frozen quantizers) on full utterances (1, N)."""
        teacher_mods = {**modules, "factorizer": modules["teacher_factorizer"]}
        an = analyse(teacher_mods, modules["ssl"](wav))
        return {
            "sem_latent": an.fact.sem,
            "pro_latent": an.fact.pro,
            "spk_latent": an.fact.spk,
            "sem_codes": an.sem.codes,
            "pro_codes": an.pro.codes,
            "spk_codes": an.spk.codes,
        }

    def student(self, modules, wav: torch.Tensor):
        with torch.no_grad():
            feats = modules["student_ssl"](wav)
        return analyse(modules, feats)

    def frames_per_segment(self, modules, num_samples: int, device) -> tuple[int, int]:
        """(sem, pro) frames the student path gives for a segment of `num_samples` samples."""
        with torch.no_grad():
            an = self.student(modules, torch.zeros(1, num_samples, device=device))
        return an.sem.codes.shape[1], an.pro.codes.shape[1]

    def setup(self, ctx, modules) -> None:
        from siren.data.cache_fill import fill_teacher
        from siren.metrics.drift import DriftReference
        from siren.metrics.profile import load_or_compute_profile

        # Teacher latents and codes for train and val (which the evaluation reads), each rank its share.
        if self.cfg.loss.teacher_targets == "full":
            root = Path(self.cfg.data.feature_cache or RunDir(ctx.run_dir).cache)
            fill_teacher(self, modules, ctx.train_dataset, ctx.val_dataset, ctx.ranks, ctx.device, root)
        reference = ctx.val_utterances if len(ctx.val_utterances) else ctx.train_utterances
        profile = load_or_compute_profile(RunDir(ctx.run_dir).baseline_profile, ctx, modules, reference, self)
        self.drift_ref = DriftReference(profile, self.code_layout(modules), ctx.device)

    def metric_sources(self, modules):
        from siren.train.stages.base import MetricSources

        return MetricSources(
            layout=self.code_layout(modules),
            drift=self.drift_ref,
            drift_rate="rate/bps_entropy",
            digits=self.code_digits(modules),
        )

    def profile_modules(self, modules) -> dict[str, nn.Module]:
        """The baseline's own analysis path, for the baseline profile."""
        return {**modules, "factorizer": modules["teacher_factorizer"], "features": modules["ssl"]}

    # Per step ----------------------------------------------------------------------------------------------------------
    def step(self, modules, batch) -> StepOutput:
        w = self.cfg.loss
        wav, lengths = batch["wav"], batch["lengths"]
        an = self.student(modules, wav)
        mel_hat = modules["decoder"](an.sem.quantized, an.pro.quantized, an.spk.quantized)
        mel = self.mel.to(wav.device)(wav)[..., : mel_hat.shape[-1]]
        mel_mask = frame_mask(lengths, self.cfg.audio.hop_length, mel_hat.shape[-1])
        n_sem, n_pro = an.sem.codes.shape[1], an.pro.codes.shape[1]
        if self.cfg.loss.teacher_targets == "crop":
            t = self._crop_teacher(modules, wav, n_sem, n_pro)
        else:
            t = self._teacher_targets(batch, n_sem, n_pro, wav.device)
        masks = stream_masks(lengths, an, self.geo)
        masks = {"sem": masks["sem"] & t["sem_valid"], "pro": masks["pro"] & t["pro_valid"]}
        q = {s: modules[f"{s}_quantizer"] for s in ("sem", "pro", "spk")}
        terms = {
            "mel": masked_l1(mel_hat, mel, mel_mask),
            "latent": masked_mse(an.fact.sem, t["sem_latent"], masks["sem"])
            + masked_mse(an.fact.pro, t["pro_latent"], masks["pro"])
            + masked_mse(an.fact.spk, t["spk_latent"], None),
            "agreement": masked_mse(an.sem.quantized, q["sem"].decode_codes(t["sem_codes"]), masks["sem"])
            + masked_mse(an.pro.quantized, q["pro"].decode_codes(t["pro_codes"]), masks["pro"])
            + masked_mse(an.spk.quantized, q["spk"].decode_codes(t["spk_codes"]), None),
        }
        ent = modules["entropy_model"](
            {"sem": an.sem.codes, "pro": an.pro.codes}, {"sem": masks["sem"].sum(1), "pro": masks["pro"].sum(1)}
        )
        bits, seconds = entropy_rate(ent, masks, self.geo)
        terms["entropy"] = ent.loss.detach()  # logged; the codes are discrete, so it cannot be a gradient path
        loss = w.mel * terms["mel"] + w.latent * terms["latent"] + w.agreement * terms["agreement"]
        from siren.metrics.drift import agreement_counts

        ratios = {"rate/bps_entropy": (bits, seconds)}
        for s, ref, m in (
            ("sem", t["sem_codes"], masks["sem"]),
            ("pro", t["pro_codes"], masks["pro"]),
            ("spk", t["spk_codes"], None),
        ):
            eq, tot = agreement_counts(getattr(an, s).codes, ref, m)
            ratios[f"drift/{s}/agreement"] = (eq, tot)
        return StepOutput(
            loss=loss,
            terms=terms,
            codes=stream_codes(an, masks),
            ratios=ratios,
        )

    def _crop_teacher(self, modules, wav: torch.Tensor, n_sem: int, n_pro: int) -> dict[str, torch.Tensor]:
        """Teacher targets from the teacher path on the crop itself (B, N); frames past the audio are masked by the
        batch lengths like the student's."""
        with torch.no_grad():
            t = self.teacher(modules, wav)
        out = {k: v.detach() for k, v in t.items()}
        for stream, n in (("sem", n_sem), ("pro", n_pro)):
            for kind in ("latent", "codes"):
                x = out[f"{stream}_{kind}"][:, :n]
                if x.shape[1] < n:
                    raise LayoutMismatch(f"teacher gives {x.shape[1]} {stream} frames on the crop, the student {n}")
                out[f"{stream}_{kind}"] = x
            out[f"{stream}_valid"] = torch.ones(wav.shape[0], n, dtype=torch.bool, device=wav.device)
        return out

    @staticmethod
    def _teacher_targets(batch: dict, n_sem: int, n_pro: int, device) -> dict[str, torch.Tensor]:
        """The cached teacher targets cut to the batch's crops (by the DataLoader workers), on `device`."""
        from siren.data.cache_fill import TEACHER

        if TEACHER not in batch:
            raise SirenError("adapt: the batch carries no teacher targets (the teacher cache is not attached)")
        t = batch[TEACHER]
        if t["sem_codes"].shape[1] != n_sem or t["pro_codes"].shape[1] != n_pro:
            raise LayoutMismatch(
                f"cached teacher targets have {t['sem_codes'].shape[1]}/{t['pro_codes'].shape[1]} sem/pro frames per "
                f"item, the student gives {n_sem}/{n_pro}"
            )
        out = {}
        for k, v in t.items():
            v = v.to(device, non_blocking=True)
            out[k] = v.float() if "latent" in k else (v.long() if "codes" in k else v)
        return out

    # Samples -----------------------------------------------------------------------------------------------------------
    def render(self, renderer, modules, utterances) -> list[Sample]:
        from siren.train.samples import mel_of, pipeline_codec, synthesize

        codecs = {
            "adapted": pipeline_codec(renderer, modules, features="student_ssl"),
            "baseline": pipeline_codec(renderer, modules, features="ssl", factorizer="teacher_factorizer"),
        }
        out = []
        for utt, wav in utterances:
            audio, mels = {"original": wav}, {"original": mel_of(self, wav)}
            for variant, codec in codecs.items():
                mel, audio_out = synthesize(codec, wav)
                mels[variant] = mel[0]
                if audio_out is not None:
                    audio[variant] = audio_out[0]
            paths = {variant: codec.render_path for variant, codec in codecs.items()}
            out.append(Sample(id=utt.id, audio=audio, mels=mels, paths=paths))
        return out
