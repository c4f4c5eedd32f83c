"""Human speech that Debian ships, made into a small eval set for `siren eval` (the last step of `siren demo`).

Sources (read-only, never modified):

- `codec2-examples` (required): `/usr/share/codec2/wav/`, 8 kHz mono recordings of read sentences. Kept: the single
  utterances of `CODEC2_CLIPS`. Left out: `all.wav` (the others concatenated), `f2400.wav` / `m2400.wav` (already
  coded by Codec 2 at 2400 bit/s: no reference), `ve9qrp`, `vk5qi`, `vk2tpm_004`, `david4` (13–112 s radio
  recordings: too long for a quick set) and `wia_16kHz` (1 s).
- `alsa-utils` (used when present): `/usr/share/sounds/alsa/`, 48 kHz mono recordings of a voice naming speaker
  positions ("Front Left", ...). `Noise.wav` is not speech and is left out.

`prepare_human_clips(out)` writes each clip as 16 kHz mono PCM_16 `out/<source>_<name>.wav` (a directory
`siren eval --data` reads) and `out/sources.json` (where each came from, its rate and length). A missing
codec2-examples, or a missing file of either package, is an error naming the package and how to install it.
"""

from __future__ import annotations

import json
from pathlib import Path

from siren.errors import SirenError

SAMPLE_RATE = 16000
CODEC2_ROOT = Path("/usr/share/codec2/wav")
ALSA_ROOT = Path("/usr/share/sounds/alsa")
CODEC2_CLIPS = ("big_dog", "cross", "forig", "hts1a", "hts2a", "mmt1", "morig")
ALSA_CLIPS = (
    "Front_Center",
    "Front_Left",
    "Front_Right",
    "Rear_Center",
    "Rear_Left",
    "Rear_Right",
    "Side_Left",
    "Side_Right",
)


class HumanClipsMissing(SirenError):
    """The Debian package holding the human recordings is not installed (or is missing files)."""


def _install_hint(package: str) -> str:
    return f"install it with: sudo apt-get install -y {package}"


def find_human_clips(
    codec2_root: str | Path = CODEC2_ROOT, alsa_root: str | Path | None = ALSA_ROOT
) -> list[tuple[str, str, Path]]:
    """(id, package, source file) of every clip, codec2-examples first. codec2-examples must be there; alsa-utils is
    used when its folder exists (`alsa_root=None` leaves it out). A listed file missing from a present package is an
    error naming it."""
    codec2_root = Path(codec2_root)
    if not codec2_root.is_dir():
        raise HumanClipsMissing(
            f"human speech clips: {codec2_root} not found: the Debian package codec2-examples is not installed; "
            + _install_hint("codec2-examples")
        )
    found: list[tuple[str, str, Path]] = []
    sources = [("codec2-examples", "codec2", codec2_root, CODEC2_CLIPS)]
    if alsa_root is not None and Path(alsa_root).is_dir():
        sources.append(("alsa-utils", "alsa", Path(alsa_root), ALSA_CLIPS))
    for package, prefix, root, names in sources:
        missing = [n for n in names if not (root / f"{n}.wav").is_file()]
        if missing:
            raise HumanClipsMissing(
                f"human speech clips: {package} in {root} lacks {', '.join(f'{n}.wav' for n in missing)}; "
                f"reinstall the Debian package {package}: sudo apt-get install --reinstall -y {package}"
            )
        found += [(f"{prefix}_{n}", package, root / f"{n}.wav") for n in names]
    return found


def prepare_human_clips(
    out: str | Path,
    *,
    codec2_root: str | Path = CODEC2_ROOT,
    alsa_root: str | Path | None = ALSA_ROOT,
    max_clips: int | None = None,
) -> dict:
    """Write the clips as 16 kHz mono PCM_16 wavs into `out` (+ `sources.json`) → that summary:
    {"dir", "clips": [{"id", "package", "source", "source_rate", "seconds"}], "packages", "seconds"}.
    `max_clips` keeps the first N, taken alternately from each package so both kinds of recording stay in."""
    import soundfile as sf

    from siren.data.audio import load_audio, save_audio

    clips = find_human_clips(codec2_root, alsa_root)
    if max_clips is not None:
        if max_clips < 1:
            raise ValueError(f"prepare_human_clips: max_clips must be at least 1, got {max_clips}")
        by_pkg: dict[str, list] = {}
        for c in clips:
            by_pkg.setdefault(c[1], []).append(c)
        rounds = [c for group in zip(*by_pkg.values()) for c in group]  # alternate the packages, as far as the shortest
        rest = [c for c in clips if c not in rounds]
        keep = {c[0] for c in (rounds + rest)[:max_clips]}
        clips = [c for c in clips if c[0] in keep]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for uid, package, src in clips:
        wav = load_audio(src, SAMPLE_RATE)  # mono (mean of channels), resampled
        save_audio(out / f"{uid}.wav", wav, SAMPLE_RATE)
        rows.append(
            {
                "id": uid,
                "package": package,
                "source": str(src),
                "source_rate": sf.info(str(src)).samplerate,
                "seconds": wav.shape[0] / SAMPLE_RATE,
            }
        )
    stale = [p for p in out.glob("*.wav") if p.stem not in {r["id"] for r in rows}]
    for p in stale:  # a folder reused with fewer clips must not feed the old ones to `siren eval --data`
        p.unlink()
    summary = {
        "dir": str(out),
        "clips": rows,
        "packages": sorted({r["package"] for r in rows}),
        "seconds": sum(r["seconds"] for r in rows),
    }
    (out / "sources.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
