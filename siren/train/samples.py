"""Audio samples at every checkpoint (docs/training.md#samples).

A fixed list of eval utterances is rendered through the inference pipeline (factorizer → quantizers → fuser → flow →
vocoder; `pipeline.flow` and `pipeline.vocoder` name the checkpoints) and written to `step_N/samples/` as wavs and mel
PNGs; with W&B on, one aligned `wandb.Table` per checkpoint. The trainer resolves the pipeline checkpoints before step 1
(a missing or unloadable one is an error then, never a silently skipped or substituted sample) and they are loaded from
the step dirs it recorded. An unset `pipeline.*` renders what the stage can without it, and says so in the file names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from siren.config.stages import PIPELINE_PARTS
from siren.errors import SirenError

log = logging.getLogger("siren")
SAMPLE_SEED = 1234  # flow noise for samples: fixed, and drawn from its own generator so training RNG is untouched


def load_pipeline(renderer, which: str) -> nn.Module | dict[str, nn.Module] | None:
    """`flow` → {"fuser", "flow"} from `pipeline.flow`; `vocoder` → the vocoder from `pipeline.vocoder`; None if absent."""
    cache = renderer.__dict__.setdefault("_pipeline", {})
    if which in cache:
        return cache[which]
    from siren.checkpoints.load import load_checkpoint

    uri = renderer.pipeline_paths.get(which) or getattr(renderer.cfg.pipeline, which)
    own = PIPELINE_PARTS[which]
    result = None
    if all(n in renderer.modules for n in own):  # the stage trains these itself: render with the live weights
        result = renderer.modules["vocoder"] if which == "vocoder" else {n: renderer.modules[n] for n in own}
    elif uri is None:
        log.warning("samples: pipeline.%s is not set; samples render without %s", which, "/".join(own))
    else:  # a failure here is an error: the trainer checked this checkpoint before step 1
        ck = load_checkpoint(str(uri), list(own))
        for m in ck.modules.values():
            m.to(renderer.device).eval().requires_grad_(False)
        result = ck.modules["vocoder"] if which == "vocoder" else ck.modules
    cache[which] = result
    return result


def mel_of(stage, wav: torch.Tensor) -> torch.Tensor:
    """(N,) → (n_mels, N // hop) log-mel with the stage's front end."""
    return stage.mel.to(wav.device)(wav[None])[0]


def pipeline_codec(renderer, modules, *, features: str, factorizer: str = "factorizer", flow: bool = True):
    """A `Codec` over the live modules being rendered (features, factorizer, quantizers, decoder head if any) and the
    pipeline checkpoints (`pipeline.flow` unless `flow=False`, `pipeline.vocoder`); samples render through it."""
    from siren.codec import Codec

    cfg = renderer.cfg
    comps = {features: modules[features], "factorizer": modules[factorizer]}
    comps.update({n: modules[n] for n in ("sem_quantizer", "pro_quantizer", "spk_quantizer")})
    if "decoder" in modules:
        comps["decoder"] = modules["decoder"]
    fl = load_pipeline(renderer, "flow") if flow else None
    if fl is not None:
        comps.update(fl)
    vocoder = load_pipeline(renderer, "vocoder")
    if vocoder is not None:
        comps["vocoder"] = vocoder
    return Codec.from_config(comps, cfg, features)


def synthesize(codec, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """wav (N,) → codes → mel (1, n_mels, T) through the codec's mel path → vocoder audio (1, N') or None."""
    codes = codec.encode(wav)
    mel = codec.decode_mel(codes, seed=SAMPLE_SEED)
    audio = codec.vocode(mel) if codec.has("vocoder") else None
    return mel, audio


def clip_min_samples(stage, modules: dict[str, nn.Module]) -> int:
    """Fewest samples every analysis path of `stage` can encode (one prosody frame of features from each feature
    extractor it holds), from the stage's frame geometry and the extractors' `num_frames`; 0 for a stage that encodes
    nothing (no `geo`)."""
    from siren.codec import min_encodable_samples

    geo = getattr(stage, "geo", None)
    if geo is None:
        return 0
    fxs = [modules[n] for n in ("ssl", "student_ssl") if n in modules and hasattr(modules[n], "num_frames")]
    return max(
        (min_encodable_samples(fx.num_frames, geo.pro_hop, geo.pro_downsample) for fx in fxs), default=geo.pro_hop
    )


def eval_utterances(cfg, min_samples: int = 0) -> list:
    """The utterances samples render: `samples.utterances` by id (one too short to encode is an error naming it), or
    a speaker-balanced pick among the eligible ones (rows `row_problems` passes at `min_samples`)."""
    from siren.data.datasets import speaker_balanced_subset
    from siren.data.manifest import log_excluded, read_manifest, usable_utterances

    manifest = cfg.data.val or cfg.data.train
    utts = read_manifest(manifest)
    usable, excluded = usable_utterances(utts, cfg.audio.sample_rate, min_samples)
    if cfg.samples.utterances:
        by_id = {u.id: u for u in utts}
        missing = [i for i in cfg.samples.utterances if i not in by_id]
        if missing:
            raise SirenError(f"samples.utterances names ids not in {manifest}: {missing}")
        why = {u.id: reason for u, reason in excluded}
        bad = [f"{i} ({why[i]})" for i in cfg.samples.utterances if i in why]
        if bad:
            raise SirenError(f"samples.utterances names utterances that cannot be rendered: {'; '.join(bad)}")
        return [by_id[i] for i in cfg.samples.utterances]
    log_excluded("samples", excluded, len(utts), manifest)
    return speaker_balanced_subset(usable, cfg.samples.num, seed=0)


def load_eval_audio(cfg, utt, pro_hop: int, min_samples: int = 0) -> torch.Tensor:
    """Whole utterance up to samples.max_seconds (but never below `min_samples`), cut to whole prosody frames
    (`pro_hop` samples each)."""
    from siren.data.audio import load_audio

    hop = pro_hop
    wav = load_audio(utt.path, cfg.audio.sample_rate)
    n = min(wav.shape[-1], max(int(cfg.samples.max_seconds * cfg.audio.sample_rate), min_samples))
    return wav[: max(hop, n - n % hop)]


# The colour scale of the mel images: ten evenly spaced stops of the viridis map (dark blue → yellow), interpolated to
# 256 entries; quiet bins are dark, loud ones bright.
_STOPS = (
    (68, 1, 84),
    (72, 40, 120),
    (62, 73, 137),
    (49, 104, 142),
    (38, 130, 142),
    (31, 158, 137),
    (53, 183, 121),
    (109, 205, 89),
    (180, 222, 44),
    (253, 231, 37),
)
MEL_RANGE = (-11.5, 2.0)  # log-mel values mapped to the two ends of the scale; outside it they are clipped


MEL_IMAGE_MAX_WIDTH = 1200  # px: a longer mel is shrunk to it (an hour of frames would be a 500,000-px-wide image)


def _palette() -> list[list[int]]:
    """The colour scale as three 256-entry lookup tables (red, green, blue) for `Image.point`."""
    out = [[], [], []]
    for i in range(256):
        x = i / 255 * (len(_STOPS) - 1)
        k = min(int(x), len(_STOPS) - 2)
        f = x - k
        for c in range(3):
            out[c].append(round(_STOPS[k][c] + (_STOPS[k + 1][c] - _STOPS[k][c]) * f))
    return out


def save_mel_png(path: Path, mel: torch.Tensor, title: str) -> None:
    """A log-mel (n_mels, frames) as a PNG: low bins at the bottom, 2 px per bin, 3 px per frame up to
    `MEL_IMAGE_MAX_WIDTH` (a longer mel is averaged down to it), under a strip that holds the title and the axes'
    units. Drawn with Pillow, which costs a checkpoint a few milliseconds where a plotting library's import and layout
    cost most of a short run's checkpoint time."""
    from PIL import Image, ImageDraw, ImageFont

    lo, hi = MEL_RANGE
    m = mel.detach().float().cpu()
    if m.dim() != 2 or m.numel() == 0:
        raise ValueError(f"save_mel_png: expected a non-empty (n_mels, frames) mel, got shape {tuple(m.shape)}")
    idx = ((m.nan_to_num(lo).clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8).flip(0)
    bins, frames = idx.shape
    width = min(frames * 3, MEL_IMAGE_MAX_WIDTH)
    shade = Image.fromarray(idx.numpy(), mode="L")
    shade = shade.resize((width, bins * 2), Image.Resampling.NEAREST if width >= frames else Image.Resampling.BOX)
    img = Image.merge("RGB", [shade.point(lut) for lut in _palette()])
    font = ImageFont.load_default()
    strip = 28
    page = Image.new("RGB", (max(img.width, 320), img.height + strip), "white")
    page.paste(img, (0, strip))
    draw = ImageDraw.Draw(page)
    draw.text((2, 1), title, fill="black", font=font)
    draw.text((2, 14), f"{bins} mel bins (low at the bottom) x {frames} frames", fill="dimgray", font=font)
    page.save(path, format="PNG")


def render_samples(renderer, out_dir: Path, step: int) -> list[Path]:
    from siren.data.audio import save_audio

    cfg = renderer.cfg
    dev = renderer.device
    least = clip_min_samples(renderer.stage, renderer.modules)
    utts = eval_utterances(cfg, least)
    geo = getattr(renderer.stage, "geo", None)  # stages without codes (vocoder, distill) cut to whole mel frames
    pro_hop = geo.pro_hop if geo is not None else cfg.audio.hop_length
    inputs = []
    for u in utts:
        wav = load_eval_audio(cfg, u, pro_hop, least)
        if wav.shape[-1] < least:  # the file is shorter than its manifest row says: not rendered, said so
            log.warning(
                "samples: %s holds %d samples, fewer than the %d the codec can encode; not rendered",
                u.id,
                wav.shape[-1],
                least,
            )
            continue
        inputs.append((u, wav.to(dev)))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        samples = renderer.stage.render(renderer, renderer.modules, inputs)
    written = []
    if samples:
        out_dir.mkdir(parents=True, exist_ok=True)
    index = []
    for s in samples:
        for variant in (*s.audio, *s.mels):
            if variant != "original" and not s.paths.get(variant):
                raise SirenError(
                    f"{renderer.stage.name}.render gave variant {variant!r} of {s.id} without the path that rendered it "
                    "(Sample.paths): a sample must name its pipeline"
                )
        for variant, wav in s.audio.items():
            p = out_dir / sample_file(s, variant, "wav")
            save_audio(p, wav.detach().float().cpu(), cfg.audio.sample_rate)
            written.append(p)
        for variant, mel in s.mels.items():
            p = out_dir / sample_file(s, variant, "png")
            save_mel_png(p, mel, f"{s.id} {variant} [{s.paths.get(variant, 'input')}] (step {step})")
            written.append(p)
        index.append({"id": s.id, "paths": {v: s.paths.get(v, "input") for v in (*s.audio, *s.mels)}})
    if samples:  # which checkpoints the pipeline parts came from, beside the files they rendered
        sources = {k: str(v) for k, v in renderer.pipeline_paths.items()}
        (out_dir / "index.json").write_text(json.dumps({"step": step, "pipeline": sources, "samples": index}, indent=1))
    if renderer.tracker.media_enabled and samples:  # building media costs time: only when W&B is on
        renderer.tracker.log_media({"samples": samples_table(out_dir)}, step)
    return written


def samples_table(out_dir: Path):
    """The `wandb.Table` of one checkpoint's samples, built from the files in `out_dir` (its `index.json`, wavs and
    PNGs): what a checkpoint logs, and what a resumed run logs again for the checkpoints it replays."""
    import wandb

    index = json.loads((Path(out_dir) / "index.json").read_text())["samples"]
    variants = sorted({v for s in index for v in s["paths"]}, key=_variant_order)
    label = {}
    for v in variants:
        path = next(s["paths"][v] for s in index if v in s["paths"])
        label[v] = v if v == "original" else f"{v} [{path}]"
    columns = ["id"] + [f"audio/{label[v]}" for v in variants] + [f"mel/{label[v]}" for v in variants]
    table = wandb.Table(columns=columns)
    for s in index:
        wavs = [Path(out_dir) / _file_name(s["id"], v, s["paths"].get(v), "wav") for v in variants]
        pngs = [Path(out_dir) / _file_name(s["id"], v, s["paths"].get(v), "png") for v in variants]
        row = [s["id"]]
        row += [wandb.Audio(str(p)) if p.is_file() else None for p in wavs]
        row += [wandb.Image(str(p)) if p.is_file() else None for p in pngs]
        table.add_data(*row)
    return table


def sample_file(sample, variant: str, ext: str) -> str:
    """`<id>_<variant>.<path>.<ext>` (`<id>_original.<ext>` for the input): the file names the path that rendered it."""
    return _file_name(sample.id, variant, sample.paths.get(variant), ext)


def _file_name(sample_id: str, variant: str, path: str | None, ext: str) -> str:
    # index.json records the input's path as "input"; its files carry no path
    return f"{sample_id}_{variant}.{path}.{ext}" if path and path != "input" else f"{sample_id}_{variant}.{ext}"


def _variant_order(v: str) -> tuple[int, str]:
    order = {"original": 0, "adapted": 1, "baseline": 2}
    return (order.get(v, 3), v)


class SamplesHook:
    """Renders the eval utterances at a checkpoint (rank 0). It is what a stage's `render` receives as `renderer`:
    the config, the device, the live modules and the pipeline checkpoints it loaded (cached for the run)."""

    def __init__(
        self,
        cfg,
        stage,
        modules: dict[str, nn.Module],
        device: torch.device,
        tracker,
        trainable_root,
        pipeline_paths: dict[str, Path] | None = None,
    ):
        self.cfg, self.stage, self.modules, self.device, self.tracker = cfg, stage, modules, device, tracker
        self._root = trainable_root
        self.pipeline_paths = dict(pipeline_paths or {})

    def __call__(self, out_dir: Path, step: int) -> None:
        if not self.cfg.samples.enabled:
            return
        was_training = [m.training for m in self._root.modules()]
        self._root.eval()
        try:
            render_samples(self, out_dir, step)
        finally:
            for m, t in zip(self._root.modules(), was_training, strict=True):
                m.training = t
