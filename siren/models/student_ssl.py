"""TinyHubert: a small `transformers.HubertModel` + linear head to the teacher's feature dim (the `distill` student)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import HubertModel

from siren.models.ssl import hubert_num_frames, load_hubert_strict, tiny_hubert_config

HEAD_FILE = "head.safetensors"
META_FILE = "student.json"


class TinyHubert(nn.Module):
    """wav (B, N) → (B, T, teacher_dim): last hidden state of a small HuBERT through a linear head."""

    frame_rate = 50

    def __init__(self, hubert: HubertModel, teacher_dim: int):
        super().__init__()
        self.hubert = hubert
        self.head = nn.Linear(hubert.config.hidden_size, teacher_dim)

    @classmethod
    def from_config(
        cls,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        conv_dim: int,
        teacher_dim: int,
    ) -> TinyHubert:
        cfg = tiny_hubert_config(hidden_size, num_layers, num_heads, intermediate_size, conv_dim)
        return cls(HubertModel(cfg), teacher_dim)

    @property
    def dim(self) -> int:
        return self.head.out_features

    def num_frames(self, num_samples: int) -> int:
        return hubert_num_frames(self.hubert.config, num_samples)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() != 2:
            raise ValueError(f"expected wav (B, N), got shape {tuple(wav.shape)}")
        return self.head(self.hubert(wav).last_hidden_state)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """dir/hubert (HF save_pretrained) + dir/head.safetensors + dir/student.json ({"teacher_dim": D})."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.hubert.save_pretrained(out / "hubert")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(out / HEAD_FILE))
        (out / META_FILE).write_text(json.dumps({"teacher_dim": self.dim}) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TinyHubert:
        """Strict load of a dir written by `save_pretrained`; anything missing is an error naming the file."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(
                f"student_ssl: {root} is not a directory; save one with TinyHubert.save_pretrained "
                "or train it with the `distill` stage"
            )
        for name in ("hubert", HEAD_FILE, META_FILE):
            if not (root / name).exists():
                raise FileNotFoundError(f"student_ssl: {root / name} is missing (not a TinyHubert.save_pretrained dir)")
        teacher_dim = int(json.loads((root / META_FILE).read_text())["teacher_dim"])
        model = cls(load_hubert_strict(root / "hubert", "student_ssl"), teacher_dim)
        model.head.load_state_dict(load_file(str(root / HEAD_FILE)), strict=True)
        return model
