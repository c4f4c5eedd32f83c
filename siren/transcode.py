"""`siren encode` / `siren decode`: files or directories in, one output per file, errors listed per file.

    siren encode IN.wav OUT.siren --checkpoint URI        one file
    siren encode IN... --out DIR --checkpoint URI         files and directories (searched recursively)
    siren decode IN.siren OUT.wav [--checkpoint URI]      one file
    siren decode IN... --out DIR [--checkpoint URI]

A file that fails (unreadable audio, too short, damaged bitstream, unknown model) is reported with its reason and the
batch goes on; the exit code is 1 if any file failed. Encoding records checkpoint ↔ model id in a local registry
(the artifact cache) so `siren decode` finds the checkpoint from the file's model id when none is given.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from siren.errors import SirenError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
SIREN_SUFFIX = ".siren"


def _model_registry() -> Path:
    from siren.checkpoints.artifacts import artifact_cache_dir

    return artifact_cache_dir() / "models"


def register_model(codec) -> None:
    from siren.coding.bitstream import model_id

    reg = _model_registry()
    reg.mkdir(parents=True, exist_ok=True)
    (reg / f"{model_id(codec._code_modules()).hex()}.json").write_text(
        json.dumps({"checkpoint": codec.source.get("checkpoint")})
    )


def checkpoint_for(data: bytes) -> str:
    """The checkpoint recorded for a bitstream's model id (see `register_model`)."""
    from siren.coding.bitstream import BitstreamError, read_header

    mid = read_header(data)["model_id"].hex()
    p = _model_registry() / f"{mid}.json"
    if not p.is_file():
        raise BitstreamError(f"no local checkpoint is known for model id {mid}; pass --checkpoint URI")
    return json.loads(p.read_text())["checkpoint"]


def expand(inputs: list[str], suffixes: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """Files and directories → (file, path relative to the output dir) pairs; directories are searched recursively."""
    out = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            out += [(f, f.relative_to(p)) for f in found]
        else:
            out.append((p, Path(p.name)))  # a missing file is reported by its own error when it is read
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _run_batch(jobs: list[tuple[Path, Path]], work, desc: str, batch: bool) -> list[tuple[Path, str]]:
    """Run `work(src, dst)` on every job with a progress bar. In batch form (--out) user errors are collected and
    never stop the batch; the single-file form raises them (exit code 2, as every other command)."""
    from tqdm import tqdm

    from siren.errors import USER_ERRORS

    failed = []
    bar = tqdm(jobs, desc=desc, unit="file", disable=len(jobs) < 2, file=sys.stderr)
    for src, dst in bar:
        if not batch:
            work(src, dst)
            continue
        try:
            work(src, dst)
        except (*USER_ERRORS, ValueError) as exc:
            failed.append((src, str(exc)))
            bar.write(f"failed: {src}: {exc}")
    return failed


def _report(jobs: int, failed: list[tuple[Path, str]], what: str, t0: float) -> int:
    if failed:
        print(f"{len(failed)} of {jobs} files failed to {what}:", file=sys.stderr)
        for src, why in failed:
            print(f"  {src}: {why}", file=sys.stderr)
        return 1
    if jobs > 1:
        print(f"{jobs} files {what}d in {time.time() - t0:.1f} s")
    return 0


def _jobs(args, in_suffixes: tuple[str, ...], out_suffix: str) -> list[tuple[Path, Path]]:

    if args.out is None:
        if len(args.inputs) != 2:
            raise SirenError(
                f"give INPUT OUTPUT for one file, or INPUT... --out DIR for several (got {len(args.inputs)} paths)"
            )
        return [(Path(args.inputs[0]), Path(args.inputs[1]))]
    jobs = expand(args.inputs, in_suffixes)
    if not jobs:
        raise SirenError(f"no input files found in {', '.join(args.inputs)} (looking for {', '.join(in_suffixes)})")
    return [(src, Path(args.out) / rel.with_suffix(out_suffix)) for src, rel in jobs]


def encode_cli(args) -> int:
    from siren.codec import Codec
    from siren.data.audio import load_audio

    jobs = _jobs(args, AUDIO_SUFFIXES, SIREN_SUFFIX)
    codec = Codec.from_checkpoint(args.checkpoint, use_pipeline=False)
    register_model(codec)
    t0 = time.time()

    def work(src: Path, dst: Path) -> None:
        import soundfile as sf

        try:
            rate = int(sf.info(str(src)).samplerate)
        except Exception:  # unreadable: load_audio below names the problem
            rate = codec.sample_rate
        if rate != codec.sample_rate:  # training skips such files; encoding converts them, and says so
            up = f" (upsampled: nothing above {rate // 2} Hz)" if rate < codec.sample_rate else ""
            print(f"{src}: {rate} Hz audio resampled to the codec's {codec.sample_rate} Hz{up}", file=sys.stderr)
        enc = codec.to_encoded(codec.encode(load_audio(src, codec.sample_rate)))
        _write_atomic(dst, enc.data)
        if len(jobs) == 1:
            print(
                f"{dst}: {len(enc.data)} bytes for {enc.seconds:.2f} s = {enc.bps:.1f} bit/s "
                f"(payload {enc.payload_bps:.1f} bit/s, entropy-model estimate {enc.estimate_bits / enc.seconds:.1f} "
                f"bit/s, header {enc.header_bits} bits)"
            )

    return _report(len(jobs), _run_batch(jobs, work, "encode", args.out is not None), "encode", t0)


def decode_cli(args) -> int:
    from siren.codec import Codec
    from siren.data.audio import save_audio
    from siren.errors import SirenError

    jobs = _jobs(args, (SIREN_SUFFIX,), ".wav")
    codecs: dict[str, Codec] = {}
    t0 = time.time()

    def work(src: Path, dst: Path) -> None:
        if not src.is_file():
            raise FileNotFoundError(f"{src} does not exist")
        data = src.read_bytes()
        uri = args.checkpoint or checkpoint_for(data)
        if uri not in codecs:
            codecs[uri] = Codec.from_checkpoint(uri, args.pipeline_flow, args.pipeline_vocoder)
        codec = codecs[uri]
        if not codec.has("vocoder"):
            raise SirenError("decoding to audio needs a vocoder: pass --pipeline-vocoder URI or set pipeline.vocoder")
        wav = codec.decode(codec.from_bytes(data))[0]
        save_audio(dst, wav, codec.sample_rate)
        if len(jobs) == 1:
            print(f"{dst}: {wav.shape[-1]} samples via {codec.mel_path} ({codec.source['checkpoint']})")

    return _report(len(jobs), _run_batch(jobs, work, "decode", args.out is not None), "decode", t0)
