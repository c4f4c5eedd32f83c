"""Check an install right after `make install`: the lock is what is installed, and every compiled library loads.

`python -m siren.install_check [--lock requirements.lock]` exits 0 when

- every package pinned in the lock (for this interpreter and platform) is installed at exactly the pinned version, and
- every compiled library the project uses loads and does one small piece of real work: torch, torchaudio's
  extension, soundfile's libsndfile, constriction, onnxruntime and the other extensions of the `eval` extra, and
  numba compiles librosa's kernels into their cache (so the first verify or eval does not).

Otherwise it prints one line per problem, naming the package and its installed version, and exits 1. It takes a few
seconds (about 20 the first time, while numba compiles), so a broken wheel (a torchaudio built against another torch,
say) stops `make install` instead of the test collection minutes later. It imports nothing of SIREN beyond this module.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from collections.abc import Callable
from pathlib import Path

# A lock line: `name==version \` or `name==version ; marker \` (pip-compile's output, markers optional).
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?\s*$")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """The lock's pins that apply to this interpreter: {canonical name: version}."""
    from packaging.markers import Marker

    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = _PIN.match(line)
        if not m:
            continue
        name, version, marker = m.group(1), m.group(2), m.group(3)
        if marker and not Marker(marker).evaluate():
            continue
        pins[_canon(name)] = version
    if not pins:
        raise ValueError(f"{path} holds no `name==version` pins: is it a lock file?")
    return pins


def version_problems(pins: dict[str, str]) -> list[str]:
    problems = []
    for name, want in sorted(pins.items()):
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"{name}: locked at {want}, not installed")
            continue
        if have != want:
            problems.append(f"{name}: locked at {want}, installed {have}")
    return problems


# ---- the compiled libraries, each loaded and made to do one small thing -------------------------------------------


def _torch() -> None:
    import torch

    x = torch.arange(8, dtype=torch.float32)
    if float(torch.fft.rfft(x).abs().sum()) <= 0:
        raise RuntimeError("torch.fft returned zeros")


def _torchaudio() -> None:
    import torch
    import torchaudio
    import torchaudio.functional as F
    from torchaudio import _extension

    # Importing torchaudio loads its compiled extension (libtorchaudio): a build for another torch fails there. A
    # wheel without the extension falls back to Python loops silently, so its presence is required too.
    if not _extension._IS_TORCHAUDIO_EXT_AVAILABLE:
        raise RuntimeError("torchaudio's compiled extension (_torchaudio) was not found")
    torch.ops.torchaudio._lfilter_core_loop  # noqa: B018 - the registered C++ op, looked up
    y = F.lfilter(torch.ones(1, 16), torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.0]))
    if y.shape != (1, 16):
        raise RuntimeError(f"torchaudio {torchaudio.__version__}: lfilter gave shape {tuple(y.shape)}")


def _soundfile() -> None:
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(160, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    buf.seek(0)
    data, sr = sf.read(buf)
    if sr != 16000 or len(data) != 160:
        raise RuntimeError(f"libsndfile {sf.__libsndfile_version__} read back {len(data)} samples at {sr} Hz")


def _constriction() -> None:
    import constriction
    import numpy as np

    coder = constriction.stream.queue.RangeEncoder()
    model = constriction.stream.model.Categorical(np.array([0.25, 0.75]), perfect=False)
    coder.encode(np.array([0, 1, 1], dtype=np.int32), model)
    decoded = constriction.stream.queue.RangeDecoder(coder.get_compressed()).decode(model, 3)
    if list(decoded) != [0, 1, 1]:
        raise RuntimeError(f"constriction round trip gave {list(decoded)}")


def _onnxruntime() -> None:
    import onnxruntime

    if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
        raise RuntimeError(f"onnxruntime offers no CPU provider: {onnxruntime.get_available_providers()}")


def _librosa() -> None:
    """numba compiles librosa's kernels on first use and caches them in the venv: done here, the first `siren verify`
    or `siren eval` does not pay it (~15 s of CPU on a 2-core machine). The calls are those of the scorers' mel
    spectrograms (DNSMOS, resemblyzer)."""
    import librosa
    import numpy as np

    y = (0.1 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)
    mel = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=321, hop_length=160, n_mels=120)
    db = librosa.power_to_db(mel, ref=np.max)
    if db.shape[0] != 120 or not np.isfinite(db).all():
        raise RuntimeError(f"librosa {librosa.__version__}: melspectrogram gave shape {db.shape}, or non-finite values")


def _import(module: str) -> Callable[[], None]:
    def load() -> None:
        __import__(module)

    return load


# (what to call it, the distribution whose version the message names, the check)
CHECKS: list[tuple[str, str, Callable[[], None]]] = [
    ("torch", "torch", _torch),
    ("torchaudio extension", "torchaudio", _torchaudio),
    ("soundfile / libsndfile", "soundfile", _soundfile),
    ("constriction", "constriction", _constriction),
    ("safetensors", "safetensors", _import("safetensors.torch")),
    ("tokenizers", "tokenizers", _import("tokenizers")),
    ("onnxruntime (eval)", "onnxruntime", _onnxruntime),
    ("pesq (eval)", "pesq", _import("pesq")),
    ("webrtcvad (eval)", "webrtcvad", _import("webrtcvad")),
    ("pocketsphinx (eval)", "pocketsphinx", _import("pocketsphinx")),
    ("librosa / numba (eval)", "librosa", _librosa),
]


def library_problems(checks=CHECKS) -> list[str]:
    import warnings

    problems = []
    for label, dist, check in checks:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation chatter of old extensions (webrtcvad) is not a failure
                check()
        except Exception as exc:  # noqa: BLE001 - every failure to load is reported, with its package
            try:
                version = md.version(dist)
            except md.PackageNotFoundError:
                version = "not installed"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            problems.append(f"{label}: {dist} {version} does not load: {type(exc).__name__}: {first}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m siren.install_check", description=__doc__.splitlines()[0])
    ap.add_argument("--lock", type=Path, default=Path("requirements.lock"), help="the lock the venv was installed from")
    args = ap.parse_args(argv)
    if not args.lock.is_file():
        print(f"install check: lock file {args.lock} does not exist", file=sys.stderr)
        return 2
    pins = read_lock(args.lock)
    problems = version_problems(pins) + library_problems()
    if problems:
        print(f"install check: {len(problems)} problem(s) in {sys.prefix}:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        print(
            "fix: `make install` again; if a locked version itself is broken, `make lock` and commit the new lock",
            file=sys.stderr,
        )
        return 1
    print(f"install check: {len(pins)} locked packages at their versions, {len(CHECKS)} compiled libraries load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
