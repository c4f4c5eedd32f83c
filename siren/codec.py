"""The assembled codec (docs/bitstream.md#the-python-api): wav → codes → bytes → codes → wav, from checkpoint URIs.

Encoder side: features (SSL teacher for a `codec` checkpoint, TinyHubert student for an `adapt` one) → factorizer →
quantizers; the entropy model range-codes the codes (`siren.coding.bitstream`). Decoder side: dequantize → fuser →
flow → vocoder, or the training-time decoder head when no flow checkpoint is given. The decoder side never loads the
SSL model: features are built on the first `encode`.

    codec = Codec.from_checkpoint("runs/demo/adapt")
    codes = codec.encode(wav)                # wav (N,), (B, N) or a list, at codec.sample_rate (else sample_rate=)
    wav_hat = codec.decode(codes)            # a list: one (N_i,) per utterance, each as long as its input

Long inputs are analysed in overlapping chunks (`max_chunk_seconds`), so memory does not grow with the square of
the length through the attention layers of the feature extractor and factorizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from siren.config.stages import ANALYSIS_PARTS
from siren.errors import SirenError
from siren.models.roles import FrameGeometry, can_range_code

if TYPE_CHECKING:
    from siren.coding.bitstream import Encoded

log = logging.getLogger("siren")
FLOW_SEED = 0  # flow noise for decoding: fixed, from its own generator, so a decode is reproducible
CODE_LANGUAGE = ("sem_quantizer", "pro_quantizer", "spk_quantizer")


class ClipTooShort(SirenError):
    """Audio shorter than the fewest samples the codec can encode (one prosody frame of features)."""


def min_encodable_samples(num_frames, pro_hop: int, pro_downsample: int, limit_samples: int = 10**8) -> int:
    """Fewest samples that yield one prosody code: a whole number of prosody hops (encode cuts to them) whose
    features, by the extractor's own `num_frames(n)`, fill the `pro_downsample` frames one prosody frame takes.
    Derived, never a constant: an extractor whose conv stack eats more edge samples needs more hops."""
    n = pro_hop
    while num_frames(n) < pro_downsample:
        n += pro_hop
        if n > limit_samples:
            raise SirenError(
                f"the feature extractor never yields {pro_downsample} frames (num_frames({n}) = {num_frames(n)}): "
                "no clip length can be encoded"
            )
    return n


@dataclass
class Codes:
    """One batch of coded utterances.

    sem (B, Ts, L) long at the semantic rate, pro (B, Tp, L) long at the prosody rate (Tp = Ts / 4), spk (B, G) long
    per utterance; sem_frames (B,) valid semantic frames per item (the rest is padding); sample_rate and sem_hop give
    the time axis: item i covers sem_frames[i] × sem_hop samples.
    """

    sem: torch.Tensor
    pro: torch.Tensor
    spk: torch.Tensor
    sem_frames: torch.Tensor
    sample_rate: int
    sem_hop: int
    pro_hop: int
    extras: dict = field(default_factory=dict)
    # (B,) the length in samples of each input (≥ what its codes cover: the end that fills no whole block is not
    # coded); `decode` returns audio of this length. None: the codes' own coverage.
    input_samples: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.sem.shape[0]

    @property
    def num_samples(self) -> list[int]:
        """Samples each item's codes cover (whole semantic frames)."""
        return [int(n) * self.sem_hop for n in self.sem_frames.tolist()]

    @property
    def lengths(self) -> list[int]:
        """Each item's input length in samples: what `decode` returns."""
        if self.input_samples is None:
            return self.num_samples
        return [int(n) for n in self.input_samples.tolist()]

    def item(self, i: int) -> Codes:
        """The i-th utterance alone, cut to its valid frames."""
        n = int(self.sem_frames[i])
        return Codes(
            sem=self.sem[i : i + 1, :n],
            pro=self.pro[i : i + 1, : n * self.sem_hop // self.pro_hop],
            spk=self.spk[i : i + 1],
            sem_frames=self.sem_frames[i : i + 1],
            sample_rate=self.sample_rate,
            sem_hop=self.sem_hop,
            pro_hop=self.pro_hop,
            input_samples=None if self.input_samples is None else self.input_samples[i : i + 1],
        )

    def split(self) -> list[Codes]:
        return [self.item(i) for i in range(len(self))]


class Codec(nn.Module):
    """Registry components in `self.components` (an nn.ModuleDict) plus the frame geometry they imply.

    Build it with `Codec.from_checkpoint` (or directly from modules, for tests and training-time renders).
    """

    def __init__(
        self,
        components: dict[str, nn.Module],
        *,
        sample_rate: int,
        hop_length: int,
        feature_extractor: str = "ssl",
        flow_steps: int = 8,
        flow_solver: str = "euler",
        max_chunk_seconds: float = 30.0,
        context_seconds: float = 1.28,
        features_loader=None,
        source: dict | None = None,
        geometry: FrameGeometry | None = None,
        mel_domain=None,
    ):
        super().__init__()
        if feature_extractor not in ("ssl", "student_ssl"):
            raise ValueError(f"feature_extractor must be 'ssl' or 'student_ssl', got {feature_extractor!r}")
        self.components = nn.ModuleDict(components)
        self.feature_extractor = feature_extractor
        self.flow_steps, self.flow_solver = flow_steps, flow_solver
        self.sample_rate, self.hop_length = int(sample_rate), int(hop_length)
        if "factorizer" in self.components:  # the decoder side alone has no factorizer: geometry from `source`
            g = FrameGeometry(
                self.sample_rate,
                self.hop_length,
                self.components["factorizer"].sem_downsample,
                self.components["factorizer"].pro_downsample,
            )
        elif geometry is not None:
            g = geometry
        else:
            raise ValueError("Codec needs a factorizer or an explicit `geometry` to know its frame rates")
        self.geometry = g
        self.sem_hop, self.pro_hop = g.sem_hop, g.pro_hop
        # The run's mel front end: what `decode_mel` returns; components declaring another domain are converted
        # exactly to and from it, or refused at construction (docs/bring-your-own-codec.md).
        self.mel_domain = mel_domain
        self._check_mel_domains()
        self.max_chunk_seconds, self.context_seconds = max_chunk_seconds, context_seconds
        self._features_loader = features_loader  # builds the feature extractor on first use (decode never needs it)
        self.source = source or {}

    # ------------------------------------------------------------------------------------------------------- building
    @classmethod
    def from_checkpoint(
        cls,
        uri: str,
        flow: str | None = None,
        vocoder: str | None = None,
        *,
        device: str | torch.device = "cpu",
        use_pipeline: bool = True,
    ) -> Codec:
        """A codec from a `codec` or `adapt` checkpoint URI (step dir, run dir, or `wandb:` artifact).

        `flow` (fuser + flow) and `vocoder` default to the checkpoint's own `pipeline.flow` / `pipeline.vocoder` when
        `use_pipeline`; without a flow the decoder head renders the mel. The flow checkpoint must read the codes of
        these quantizers (same fingerprints), or this raises naming both checkpoints.
        """
        from siren.checkpoints.lineage import verified_code_language
        from siren.checkpoints.load import load_checkpoint, open_checkpoint

        ref = open_checkpoint(uri)  # resolved and read once; every load below reuses it
        if ref.meta.stage not in ("adapt", "codec"):
            raise SirenError(
                f"{uri} is a {ref.meta.stage!r} checkpoint; a codec is built from a codec or adapt checkpoint"
            )
        names = [*ANALYSIS_PARTS, "entropy_model"]
        if "decoder" in ref.components:
            names.append("decoder")
        ck = load_checkpoint(ref, names)
        cfg = ck.cfg
        mods = dict(ck.modules)
        verified_code_language(mods, ref.meta, str(ref.path))  # rebuilt grid constants = the ones it was trained with
        if use_pipeline:
            flow = flow or cfg.pipeline.flow
            vocoder = vocoder or cfg.pipeline.vocoder
        source = {"checkpoint": str(ck.path), "flow": None, "vocoder": None}
        if flow:
            fl = load_checkpoint(flow, ["fuser", "flow"])
            _check_code_language(mods, fl, str(ck.path))
            mods.update(fl.modules)
            source["flow"] = str(fl.path)
        if vocoder:
            vc = load_checkpoint(vocoder, ["vocoder"])
            mods["vocoder"] = vc.modules["vocoder"]
            source["vocoder"] = str(vc.path)
        feat = "student_ssl" if ref.meta.stage == "adapt" else "ssl"

        def load_features() -> nn.Module:  # on first use: decoding codes needs no feature extractor
            return load_checkpoint(ref, [feat]).modules[feat]

        codec = cls.from_config(mods, cfg, feat, features_loader=load_features, source=source)
        return codec.to(device).eval().requires_grad_(False)

    @classmethod
    def from_config(cls, components: dict[str, nn.Module], cfg, feature_extractor: str, **kwargs) -> Codec:
        """A Codec over `components` with the audio front end and flow solver of config `cfg`."""
        from siren.models.mel import MelDomain

        return cls(
            components,
            mel_domain=MelDomain.of_audio(cfg.audio),
            sample_rate=cfg.audio.sample_rate,
            hop_length=cfg.audio.hop_length,
            feature_extractor=feature_extractor,
            flow_steps=cfg.flow.steps,
            flow_solver=cfg.flow.solver,
            **kwargs,
        )

    def _check_mel_domains(self) -> None:
        from siren.models.mel import MelDomainError, convert_mel, domain_of

        declared = [
            n for n in ("decoder", "flow", "vocoder") if n in self.components and domain_of(self.components[n], None)
        ]
        if declared and self.mel_domain is None:
            raise MelDomainError(
                f"{', '.join(declared)} declare a mel_domain but this codec was built without the run's mel domain"
            )
        probe = torch.zeros(1, 1, 1)
        for n in declared:  # raises now, naming the component, if no exact conversion exists
            convert_mel(probe, domain_of(self.components[n], None), self.mel_domain, what=n)

    def _to_front_end(self, mel: torch.Tensor, name: str) -> torch.Tensor:
        from siren.models.mel import convert_mel, domain_of

        src = domain_of(self.components[name], None)
        return mel if src is None else convert_mel(mel, src, self.mel_domain, what=name)

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, T) in the run's front-end domain → wav (B, T · hop) through the vocoder, converted to the
        vocoder's declared mel domain first."""
        from siren.models.mel import convert_mel, domain_of

        (vocoder,) = self._need("vocoder")
        dst = domain_of(vocoder, None)
        return vocoder(mel if dst is None else convert_mel(mel, self.mel_domain, dst, what="vocoder"))

    @property
    def device(self) -> torch.device:
        return next(self.components.parameters()).device

    def _need(self, *names: str) -> list[nn.Module]:
        missing = [n for n in names if n not in self.components]
        if missing:
            raise SirenError(f"codec is missing component(s) {missing}; it has {sorted(self.components)}")
        return [self.components[n] for n in names]

    def has(self, *names: str) -> bool:
        return all(n in self.components for n in names)

    # -------------------------------------------------------------------------------------------------------- encoder
    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (B, N) → (B, T, D) at the frame rate, from the configured feature extractor (loaded on first use)."""
        return self._extractor()(wav)

    def analyse(self, feats: torch.Tensor):
        """feats (B, T, D) → Analysis (factorizer output + sem/pro/spk QuantizedResult)."""
        from siren.models.analysis import Analysis

        fact_m, sq, pq, kq = self._need(*ANALYSIS_PARTS)
        fact = fact_m(feats)
        return Analysis(fact=fact, sem=sq(fact.sem), pro=pq(fact.pro), spk=kq(fact.spk))

    def _extractor(self) -> nn.Module:
        """The feature extractor, loaded on first use (the decoder side never needs it)."""
        if self.feature_extractor not in self.components:
            if self._features_loader is None:
                raise SirenError(f"codec has no {self.feature_extractor} to compute features with")
            fx = self._features_loader().to(self.device).eval().requires_grad_(False)
            self.components[self.feature_extractor] = fx
        return self.components[self.feature_extractor]

    @property
    def min_samples(self) -> int:
        """Fewest samples `encode` accepts, from the feature extractor's `num_frames` and the frame geometry."""
        return min_encodable_samples(self._extractor().num_frames, self.pro_hop, self.geometry.pro_downsample)

    def prepare(self, wav: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,), (B, N) or a list of (N_i,) → wav (B, N_max) zero-padded, lengths (B,) cut to whole prosody frames."""
        items = list(wav) if isinstance(wav, (list, tuple)) or wav.dim() == 2 else [wav]
        if not items:
            raise ValueError("encode got no audio")
        lengths = []
        least = self.min_samples
        for i, w in enumerate(items):
            if w.dim() != 1:
                raise ValueError(f"audio item {i}: expected (N,) samples, got shape {tuple(w.shape)}")
            n = w.shape[0] - w.shape[0] % self.pro_hop
            if w.shape[0] < least:
                sr = self.sample_rate
                raise ClipTooShort(
                    f"audio item {i} is too short to encode: {w.shape[0] / sr:.3f} s ({w.shape[0]} samples at {sr} Hz); "
                    f"the codec needs at least {least / sr:.3f} s ({least} samples: {self.geometry.pro_downsample} "
                    f"feature frames of one prosody frame, {self.pro_hop} samples per prosody hop)"
                )
            if not torch.isfinite(w[:n]).all():
                raise SirenError(f"audio item {i} contains NaN or infinite samples")
            lengths.append(n)
        out = torch.zeros(len(items), max(lengths), device=self.device)
        for i, (w, n) in enumerate(zip(items, lengths, strict=True)):
            out[i, :n] = w[:n].to(self.device, torch.float32)
        return out, torch.tensor(lengths)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor | list[torch.Tensor], sample_rate: int | None = None) -> Codes:
        """wav (N,), (B, N) or a list of (N_i,) → Codes. Each item's codes cover the whole prosody frames its features
        yield (the feature extractor's edge frames are dropped, as in training); its input length is kept, so `decode`
        and the bitstream give back as many samples as were given.

        `sample_rate`: the rate of `wav` when it is not the codec's; it is then resampled, with a warning that says so.
        Items of equal length are analysed as one batch; long items in overlapping chunks (see `analyse_long`).
        """
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            wav = self._resampled(wav, int(sample_rate))
        given = [int(w.shape[-1]) for w in (list(wav) if isinstance(wav, (list, tuple)) or wav.dim() == 2 else [wav])]
        wav, lengths = self.prepare(wav)
        B = wav.shape[0]
        max_chunk = int(self.max_chunk_seconds * self.sample_rate) // self.pro_hop * self.pro_hop
        if int(lengths.max()) <= max_chunk and bool((lengths == lengths[0]).all()):
            an = self.analyse(self.features(wav))
            sem, pro, spk = an.sem.codes, an.pro.codes, an.spk.codes
            frames = torch.full((B,), sem.shape[1])
        else:
            parts = [self.analyse_long(wav[i : i + 1, : int(lengths[i])]) for i in range(B)]
            ts = max(p[0].shape[1] for p in parts)
            tp = max(p[1].shape[1] for p in parts)
            sem = torch.stack([torch.nn.functional.pad(p[0][0], (0, 0, 0, ts - p[0].shape[1])) for p in parts])
            pro = torch.stack([torch.nn.functional.pad(p[1][0], (0, 0, 0, tp - p[1].shape[1])) for p in parts])
            spk = torch.cat([p[2] for p in parts])
            frames = torch.tensor([p[0].shape[1] for p in parts])
        return Codes(
            sem=sem.cpu(),
            pro=pro.cpu(),
            spk=spk.cpu(),
            sem_frames=frames,
            sample_rate=self.sample_rate,
            sem_hop=self.sem_hop,
            pro_hop=self.pro_hop,
            input_samples=torch.tensor(given),
        )

    def _resampled(self, wav, rate: int):
        import torchaudio.functional as AF

        log.warning(
            "encode: audio at %d Hz resampled to the codec's %d Hz%s",
            rate,
            self.sample_rate,
            f" (upsampled: the band above {rate // 2} Hz is empty)" if rate < self.sample_rate else "",
        )
        if isinstance(wav, (list, tuple)):
            return [AF.resample(w.float(), rate, self.sample_rate) for w in wav]
        return AF.resample(wav.float(), rate, self.sample_rate)

    def analyse_long(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """wav (1, N), N a multiple of the prosody hop → sem, pro, spk codes, analysing chunks of at most
        `max_chunk_seconds` with `context_seconds` of audio either side that is analysed but not kept. The speaker
        embedding is the length-weighted mean of the chunks' embeddings, quantized once."""
        hop = self.pro_hop
        n = wav.shape[1]
        core = max(hop, int(self.max_chunk_seconds * self.sample_rate) // hop * hop)
        ctx = int(self.context_seconds * self.sample_rate) // hop * hop
        if n <= core:
            an = self.analyse(self.features(wav))
            return an.sem.codes, an.pro.codes, an.spk.codes
        fact_m, sq, pq, kq = self._need(*ANALYSIS_PARTS)
        sems, pros, spk_sum = [], [], 0.0
        for start in range(0, n, core):
            end = min(n, start + core)
            a, b = max(0, start - ctx), min(n, end + ctx)
            fact = fact_m(self.features(wav[:, a:b]))
            s0, s1 = (start - a) // self.sem_hop, (end - a) // self.sem_hop
            p0, p1 = (start - a) // hop, (end - a) // hop
            sems.append(fact.sem[:, s0:s1])
            pros.append(fact.pro[:, p0:p1])
            spk_sum = spk_sum + fact.spk * (end - start)
        sem = sq(torch.cat(sems, 1)).codes
        pro = pq(torch.cat(pros, 1)).codes
        spk = kq(spk_sum / n).codes
        return sem, pro, spk

    # ------------------------------------------------------------------------------------------------------ bitstream
    def _code_modules(self) -> dict[str, nn.Module]:
        names = ("sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model")
        mods = dict(zip(names, self._need(*names), strict=True))
        if not can_range_code(mods["entropy_model"]):
            em = mods["entropy_model"]
            raise SirenError(
                f"the entropy model ({type(em).__module__}:{type(em).__qualname__}) is rate-only: it gives bits per "
                "code but no next-symbol probabilities (`coder(stream)`), so it cannot drive a range coder; rate and "
                "drift metrics work, but encoding to bytes needs an entropy model with `coder` (e.g. SIREN's own, "
                "trained in a `codec` run with the other components frozen)"
            )
        return mods

    def to_bytes(self, codes: Codes) -> bytes:
        """One utterance's Codes → the bytes of a .siren file; `from_bytes` reads them back. Batches:
        `[codec.to_bytes(c) for c in codes.split()]`. Sizes and the entropy model's estimate: `to_encoded`."""
        return self.to_encoded(codes).data

    def to_encoded(self, codes: Codes) -> Encoded:
        """One utterance's Codes → an `Encoded` (`siren.coding.bitstream`): the file's bytes (`.data`), its header and
        payload bits, the entropy model's estimate and the duration, for bit/s figures."""
        from siren.coding.bitstream import encode_codes

        if len(codes) != 1:
            raise ValueError(f"a bitstream holds one utterance, got a batch of {len(codes)}: use codes.split()")
        c = codes.item(0)
        return encode_codes(
            self._code_modules(), c.sem, c.pro, c.spk, c.lengths[0], self.sample_rate, sem_hop=self.sem_hop
        )

    def from_bytes(self, data: bytes) -> Codes:
        """A .siren file's bytes → Codes (batch of 1). Raises BitstreamError if the file is damaged, from another
        model, or does not decode to its own symbol hash."""
        from siren.coding.bitstream import decode_codes

        if not isinstance(data, (bytes, bytearray, memoryview)):
            hint = ": pass its `.data`" if hasattr(data, "data") and isinstance(data.data, bytes) else ""
            raise TypeError(f"from_bytes takes the bytes of a .siren file, got {type(data).__name__}{hint}")
        sem, pro, spk, n = decode_codes(self._code_modules(), bytes(data), self.sem_hop)
        return Codes(
            sem=sem,
            pro=pro,
            spk=spk,
            sem_frames=torch.tensor([sem.shape[1]]),
            sample_rate=self.sample_rate,
            sem_hop=self.sem_hop,
            pro_hop=self.pro_hop,
            input_samples=torch.tensor([n]),
        )

    # -------------------------------------------------------------------------------------------------------- decoder
    def dequantize(self, codes: Codes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes → quantized latents sem (B, Ts, Ds), pro (B, Tp, Dp), spk (B, Dk)."""
        sq, pq, kq = self._need("sem_quantizer", "pro_quantizer", "spk_quantizer")
        d = self.device
        return sq.decode_codes(codes.sem.to(d)), pq.decode_codes(codes.pro.to(d)), kq.decode_codes(codes.spk.to(d))

    @torch.no_grad()
    def decode_mel(self, codes: Codes, steps: int | None = None, seed: int = FLOW_SEED) -> torch.Tensor:
        """Codes → log-mel (B, n_mels, 2·Ts): fuser + flow when present, else the training-time decoder head."""
        return self.mel_from_latents(*self.dequantize(codes), steps=steps, seed=seed)

    def mel_from_latents(
        self, sem: torch.Tensor, pro: torch.Tensor, spk: torch.Tensor, steps: int | None = None, seed: int = FLOW_SEED
    ) -> torch.Tensor:
        """Quantized latents → log-mel (B, n_mels, 2·Ts); the one place the mel path is chosen."""
        if self.has("fuser", "flow"):
            cond = self.components["fuser"](sem, pro, spk)
            g = torch.Generator(device=cond.device).manual_seed(seed)
            mel = self.components["flow"].sample(
                cond, steps=steps or self.flow_steps, solver=self.flow_solver, generator=g
            )
            return self._to_front_end(mel, "flow")
        if self.has("decoder"):
            return self._to_front_end(self.components["decoder"](sem, pro, spk), "decoder")
        raise SirenError("decoding needs fuser + flow (a flow checkpoint) or the codec's decoder head; it has neither")

    @property
    def mel_path(self) -> str:
        return "fuser+flow" if self.has("fuser", "flow") else "decoder head"

    @property
    def render_path(self) -> str:
        """A file-name-safe tag of the path `decode` takes: `flow` or `decoder_head`, then `-vocoder` when audio is made."""
        mel = "flow" if self.has("fuser", "flow") else "decoder_head"
        return f"{mel}-vocoder" if self.has("vocoder") else mel

    @torch.no_grad()
    def decode(self, codes: Codes, steps: int | None = None, seed: int = FLOW_SEED) -> list[torch.Tensor]:
        """Codes → one wav (N_i,) at `sample_rate` per utterance, N_i = its input's length (`codes.lengths`). The
        codes cover whole blocks: the input's last samples that fill no whole block come back as silence."""
        wav = self.vocode(self.decode_mel(codes, steps=steps, seed=seed))
        out = []
        for i, (covered, n) in enumerate(zip(codes.num_samples, codes.lengths, strict=True)):
            w = wav[i, : min(covered, n)]
            out.append(torch.nn.functional.pad(w, (0, n - w.shape[0])))
        return out

    def bps_nominal(self) -> float:
        """sem + pro bit/s from the quantizers' layout (speaker bits are per utterance and not included)."""
        sq, pq = self._need("sem_quantizer", "pro_quantizer")
        return (
            self.sample_rate / self.sem_hop * sq.num_levels * sq.bits_per_code
            + self.sample_rate / self.pro_hop * pq.num_levels * pq.bits_per_code
        )


def _check_code_language(mods: dict[str, nn.Module], flow_ck, codec_path: str) -> None:
    """The flow checkpoint reads the code language of exactly these quantizers and entropy model, grid constants
    included (docs/sharing.md#lineage), or this raises naming both checkpoints (`CodeLanguageMismatch`)."""
    from siren.checkpoints.lineage import check_flow_reads, code_language_id
    from siren.models.io import fingerprint

    fps = {n: fingerprint(mods[n]) for n in CODE_LANGUAGE}
    check_flow_reads(code_language_id(mods), codec_path, flow_ck.meta, str(flow_ck.path), fps)
