"""On-disk cache of frozen-model features (e.g. SSL layer outputs): one safetensors file per utterance id."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from siren.data.manifest import Utterance

TENSOR_NAME = "features"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def cache_key(fingerprint: str, layer: int | str) -> str:
    """Directory name for one (model fingerprint, layer): features from different weights never mix."""
    if not fingerprint:
        raise ValueError("cache_key needs a non-empty model fingerprint")
    return f"{fingerprint[:16]}-L{layer}"


class FeatureCache:
    """Features (T, D) per utterance under `root/key/<id>.safetensors`, plus `root/key/meta.json`.

    `fingerprint` and `layer` are optional and only recorded in meta.json (when given, `key` must match them).
    """

    def __init__(self, root: str | Path, key: str, *, fingerprint: str | None = None, layer: int | str | None = None):
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"invalid feature cache key {key!r} (build it with cache_key(fingerprint, layer))")
        if fingerprint is not None and layer is not None and cache_key(fingerprint, layer) != key:
            raise ValueError(f"cache key {key!r} does not match fingerprint/layer ({cache_key(fingerprint, layer)!r})")
        self.root = Path(root)
        self.key = key
        self.dir = self.root / key
        # Without explicit values, meta.json records what the key encodes (fingerprint prefix, layer).
        prefix, _, key_layer = key.rpartition("-L")
        self.fingerprint = fingerprint if fingerprint is not None else (prefix or key)
        self.layer = layer if layer is not None else (key_layer or None)

    def path(self, utt_id: str) -> Path:
        # Ids become file names: refuse anything that could escape the cache directory.
        if not _SAFE_ID.match(utt_id):
            raise ValueError(f"utterance id {utt_id!r} cannot be used as a cache file name (letters, digits, _.-)")
        return self.dir / f"{utt_id}.safetensors"

    def has(self, utt_id: str) -> bool:
        return self.path(utt_id).is_file()

    def get(self, utt_id: str) -> torch.Tensor:
        """Cached features (T, D); a missing or corrupt entry raises naming the file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = self.path(utt_id)
        if not p.is_file():
            raise FileNotFoundError(f"feature cache entry {p} does not exist (run compute() first)")
        try:
            tensors = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise RuntimeError(f"feature cache entry {p} is corrupt ({exc}); delete it to recompute") from exc
        if TENSOR_NAME not in tensors or tensors[TENSOR_NAME].dim() != 2:
            raise RuntimeError(f"feature cache entry {p} is corrupt (no 2-D '{TENSOR_NAME}' tensor); delete it")
        return tensors[TENSOR_NAME]

    def put(self, utt_id: str, features: torch.Tensor) -> Path:
        """Store features (T, D) atomically (tmp file + os.replace)."""
        from safetensors.torch import save_file

        if features.dim() != 2:
            raise ValueError(f"features for {utt_id!r} must be (T, D), got shape {tuple(features.shape)}")
        p = self.path(utt_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{utt_id}.", suffix=".tmp")
        os.close(fd)
        save_file({TENSOR_NAME: features.detach().cpu().contiguous()}, tmp)
        os.replace(tmp, p)
        return p

    def crop(self, utt_id: str, start_frame: int, num_frames: int) -> torch.Tensor:
        """Frames [start, start + num) → (num_frames, D).

        Frames past the end of the utterance's features are zeros: they line up with the zero padding of a waveform
        segment that runs past the end of its file (the batch's `lengths` mark them invalid). A crop that starts at
        or past the end, or before 0, raises: it means offsets and cache disagree (e.g. features of another file).
        """
        feats = self.get(utt_id)
        t = feats.shape[0]
        if start_frame < 0 or num_frames <= 0 or start_frame >= t:
            raise ValueError(
                f"crop of {self.path(utt_id)}: frames [{start_frame}, {start_frame + num_frames}) "
                f"do not start inside its {t} frames"
            )
        x = feats[start_frame : start_frame + num_frames]
        if x.shape[0] < num_frames:
            x = torch.cat([x, x.new_zeros(num_frames - x.shape[0], x.shape[1])])
        return x

    def compute(
        self,
        extractor: Callable[[torch.Tensor], torch.Tensor],
        utterances: Sequence[Utterance],
        sample_rate: int,
        progress: bool = True,
        batch_size: int = 1,
    ) -> int:
        """Compute missing entries with `extractor` ((B, N) → (B, T, D)) under no_grad; returns how many were computed.

        batch_size=1 is exact. batch_size>1 zero-pads each batch to its longest item and keeps the first
        floor(T_out * N_i / N_max) frames of item i: faster, but a non-causal model sees the padding.
        """
        from tqdm import tqdm

        from siren.data.audio import load_audio

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        todo = [u for u in utterances if not self.has(u.id)]
        # Similar lengths together: less padding when batching.
        todo.sort(key=lambda u: (u.duration, u.id))
        dim = self._meta().get("dim")
        bar = tqdm(total=len(todo), desc=f"features {self.key}", disable=not progress or not todo, leave=False)
        for b in range(0, len(todo), batch_size):
            chunk = todo[b : b + batch_size]
            wavs = [load_audio(u.path, sample_rate) for u in chunk]
            n_max = max(w.shape[0] for w in wavs)
            batch = torch.zeros(len(wavs), n_max)
            for k, w in enumerate(wavs):
                batch[k, : w.shape[0]] = w
            with torch.no_grad():
                out = extractor(batch)
            if out.dim() != 3 or out.shape[0] != len(chunk):
                raise ValueError(f"extractor must return (B, T, D) with B={len(chunk)}, got {tuple(out.shape)}")
            if dim is not None and out.shape[-1] != dim:
                raise ValueError(f"extractor returned D={out.shape[-1]} but {self.dir} holds D={dim} features")
            dim = int(out.shape[-1])
            for k, (u, w) in enumerate(zip(chunk, wavs, strict=True)):
                t = out.shape[1] if len(chunk) == 1 else math.floor(out.shape[1] * w.shape[0] / n_max)
                self.put(u.id, out[k, :t].float())
            bar.update(len(chunk))
        bar.close()
        if dim is not None:
            self._write_meta(dim)
        return len(todo)

    def _meta(self) -> dict:
        p = self.dir / "meta.json"
        if not p.is_file():
            return {}
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"feature cache metadata {p} is corrupt ({exc}); delete it") from exc

    def _write_meta(self, dim: int) -> None:
        meta = {
            "key": self.key,
            "fingerprint": self.fingerprint,
            "layer": self.layer,
            "dim": dim,
            "count": sum(1 for _ in self.dir.glob("*.safetensors")),
        }
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".meta.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, self.dir / "meta.json")
