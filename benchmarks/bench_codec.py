"""The codec as a product: entropy-coding cost vs length, long audio, the probability quantisation's cost, speed.

Figures (goal in brackets), all at 1 CPU thread, medians of repeats:
  1. entropy coding 60 s ÷ 10 s (encode + decode of the codes, `ultra200bps` entropy model, interleaved; its 128-frame
     context keeps the cost per frame constant past 5 s) [≤ 6.5]
  2. payload bit/s on 10 min ÷ on 10 s of the same speech (the codec2 clip repeated; tiny codec trained here) [≤ 1.02]
     and the 10-minute file decodes to the same codes
  3. bits coded with the integer frequency tables ÷ the entropy model's float estimate [≤ 1.005]
  4. `ultra200bps` with the student (TinyHubert) features, split features / analysis / entropy coding / entropy
     decoding / flow (8 steps) / vocoder; encode and decode in × real time [≥ 20, ≥ 5]

Run alone: `python benchmarks/bench_codec.py` (builds its own corpus and teacher in a temporary directory).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB__DISABLE_STATS", "true")

import torch  # noqa: E402

REAL_CLIP = Path("/usr/share/codec2/raw/speech_orig_16k.wav")
REPEATS = 3


def _timed(fn, repeats: int = REPEATS) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _speech(seconds: float, sample_rate: int = 16000) -> torch.Tensor:
    """The real codec2 clip repeated (or cut) to `seconds`."""
    from siren.data.audio import load_audio

    if not REAL_CLIP.is_file():
        raise FileNotFoundError(
            f"{REAL_CLIP} is missing: install Debian's codec2-examples (docs/data.md#the-embedded-corpus-demo-and-tests)"
        )
    clip = load_audio(REAL_CLIP, sample_rate)
    n = int(seconds * sample_rate)
    return clip.repeat(n // clip.shape[0] + 1)[:n]


def ultra_codec(student: bool = True):
    """`ultra200bps` with random weights (speed does not depend on them), student features, flow and vocoder."""
    from siren.codec import Codec
    from siren.config.loader import load_config
    from siren.models.builders import build_component

    cfg = load_config(ROOT / "configs/model/ultra200bps.yaml")
    torch.manual_seed(0)
    names = [
        "factorizer",
        "sem_quantizer",
        "pro_quantizer",
        "spk_quantizer",
        "entropy_model",
        "fuser",
        "flow",
        "vocoder",
    ]
    mods = {"student_ssl": build_component("student_ssl", cfg)}
    mods.update({n: build_component(n, cfg) for n in names})
    return Codec(
        mods,
        sample_rate=cfg.audio.sample_rate,
        hop_length=cfg.audio.hop_length,
        feature_extractor="student_ssl",
        flow_steps=cfg.flow.steps,
        flow_solver=cfg.flow.solver,
    ).eval()


def bench_speed_split(codec, seconds: float = 10.0) -> dict:
    wav = _speech(seconds)
    with torch.no_grad():
        w, _ = codec.prepare(wav)
        t_feat, feats = _timed(lambda: codec.features(w))
        t_an, _ = _timed(lambda: codec.analyse(feats))
        codes = codec.encode(wav)
        t_ent, data = _timed(lambda: codec.to_bytes(codes))
        t_dec, _ = _timed(lambda: codec.from_bytes(data))
        lat = codec.dequantize(codes)
        t_flow, mel = _timed(lambda: codec.mel_from_latents(*lat))
        t_voc, _ = _timed(lambda: codec.components["vocoder"](mel))
    enc_s, dec_s = t_feat + t_an + t_ent, t_dec + t_flow + t_voc
    return {
        "seconds": seconds,
        "features": t_feat,
        "analysis": t_an,
        "entropy_encode": t_ent,
        "entropy_decode": t_dec,
        "flow": t_flow,
        "vocoder": t_voc,
        "encode_xrt": seconds / enc_s,
        "decode_xrt": seconds / dec_s,
    }


def bench_coding_scaling(codec) -> dict:
    """Entropy encode + decode time for the codes of 60 s ÷ 10 s of the same speech, interleaved, medians."""
    codes = {secs: codec.encode(_speech(secs)) for secs in (10.0, 60.0)}
    times: dict[float, list[float]] = {10.0: [], 60.0: []}
    with torch.no_grad():
        for _ in range(REPEATS):
            for secs, c in codes.items():
                t = time.perf_counter()
                back = codec.from_bytes(codec.to_bytes(c))
                times[secs].append(time.perf_counter() - t)
                if not torch.equal(back.sem, c.sem):
                    raise RuntimeError(f"{secs:.0f} s of codes did not round-trip")
    t10, t60 = statistics.median(times[10.0]), statistics.median(times[60.0])
    return {"t10": t10, "t60": t60, "ratio": t60 / t10}


def train_tiny_codec(corpus: Path, teacher: Path, work: Path, steps: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import stage_config

    from siren.train.trainer import Trainer

    run = work / "codec_product"
    cfg = stage_config(
        "codec",
        corpus,
        teacher,
        run,
        **{
            "samples.enabled": "false",
            "data.segment_seconds": 2.0,
            "train.batch_size": 8,
            "train.max_steps": steps,
            "train.checkpoint_every": steps,
        },
    )
    Trainer(cfg).fit()
    return run


def bench_long_audio(codec) -> dict:
    """Payload bit/s of 10 min vs 10 s of the same speech; the 10-minute file must decode to the same codes."""
    res = {}
    with torch.no_grad():
        for secs in (10.0, 600.0):
            codes = codec.encode(_speech(secs))
            t = time.perf_counter()
            enc = codec.to_encoded(codes)
            t_enc = time.perf_counter() - t
            t = time.perf_counter()
            back = codec.from_bytes(enc.data)
            t_dec = time.perf_counter() - t
            same = torch.equal(back.sem, codes.sem) and torch.equal(back.pro, codes.pro)
            res[secs] = {
                "payload_bps": enc.payload_bps,
                "bps": enc.bps,
                "same": same,
                "t_enc": t_enc,
                "t_dec": t_dec,
                "quantized_over_estimate": enc.quantized_bits / enc.estimate_bits,
            }
    return res


def bench_quantisation_cost(codec, corpus: Path) -> dict:
    """Bits under the integer frequency tables ÷ bits under the float probabilities, on the eval set + the real clip."""
    from siren.data.audio import load_audio
    from siren.data.manifest import read_manifest

    q = est = 0.0
    wavs = [load_audio(u.path, codec.sample_rate) for u in read_manifest(corpus / "val.jsonl")]
    wavs.append(_speech(30.0))
    with torch.no_grad():
        for w in wavs:
            enc = codec.to_encoded(codec.encode(w))
            q += enc.quantized_bits
            est += enc.estimate_bits
    return {"ratio": q / est, "files": len(wavs)}


def run(work: Path, corpus: Path, teacher: Path, train_steps: int = 300) -> dict[str, str]:
    """All figures of this file as {figure: value} rows (strings), for BENCHMARKS.md."""
    from siren.codec import Codec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ultra = ultra_codec()
        split = bench_speed_split(ultra)
        scaling = bench_coding_scaling(ultra)
        torch.set_num_threads(threads)
        run_dir = train_tiny_codec(corpus, teacher, work, train_steps)
        torch.set_num_threads(1)
        tiny = Codec.from_checkpoint(str(run_dir), use_pipeline=False)
        longa = bench_long_audio(tiny)
        qcost = bench_quantisation_cost(tiny, corpus)
    finally:
        torch.set_num_threads(threads)
    s, l10, l600 = split, longa[10.0], longa[600.0]
    return {
        "entropy coding (encode + decode) 60 s ÷ 10 s, ultra200bps, 1 thread [≤ 6.5]": (
            f"{scaling['ratio']:.2f} ({scaling['t10']:.2f} s → {scaling['t60']:.2f} s)"
        ),
        "payload bit/s, 10 min ÷ 10 s of the codec2 clip repeated, tiny codec [≤ 1.02]": (
            f"{l600['payload_bps'] / l10['payload_bps']:.4f} ({l10['payload_bps']:.1f} → {l600['payload_bps']:.1f} "
            f"bit/s; whole file {l10['bps']:.1f} → {l600['bps']:.1f} bit/s)"
        ),
        "10-minute file decodes to the same codes": (
            f"{l600['same']} (encode {l600['t_enc']:.1f} s, decode {l600['t_dec']:.1f} s of entropy coding)"
        ),
        "integer frequency tables ÷ float estimate, bits [≤ 1.005]": (
            f"{qcost['ratio']:.4f} ({qcost['files']} files; 10 min: {l600['quantized_over_estimate']:.4f})"
        ),
        "ultra200bps student encode split, 10 s, 1 thread (s)": (
            f"features {s['features']:.3f}, analysis {s['analysis']:.3f}, entropy coding {s['entropy_encode']:.3f}"
        ),
        "ultra200bps decode split, 10 s, 8 flow steps, 1 thread (s)": (
            f"entropy decoding {s['entropy_decode']:.3f}, flow {s['flow']:.3f}, vocoder {s['vocoder']:.3f}"
        ),
        "ultra200bps encode, student features, 1 thread (× real time) [≥ 20]": f"{s['encode_xrt']:.1f}",
        "ultra200bps decode, 8 flow steps, 1 thread (× real time) [≥ 5]": f"{s['decode_xrt']:.1f}",
    }


def main() -> int:
    from common import bench_workdir, setup_corpus

    steps = int(os.environ.get("SIREN_BENCH_CODEC_STEPS", "300"))
    with bench_workdir() as work:
        corpus, teacher = setup_corpus(work)
        rows = run(work, corpus, teacher, train_steps=steps)
    for k, v in rows.items():
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
