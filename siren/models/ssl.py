"""Frozen teacher features: a `transformers.HubertModel` and the hidden states of one layer (50 Hz)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import HubertConfig, HubertModel

HOW_TO_CREATE = (
    "create a tiny stand-in with `siren init-ssl --out DIR` (siren.models.ssl.save_tiny_teacher), or set ssl.name to "
    "a HuBERT checkpoint such as facebook/hubert-base-ls960 (needs the model hub or a local save_pretrained copy)"
)


def _looks_like_hub_id(name: str) -> bool:
    """`org/model` (exactly one slash, no leading ./ or /) may be a hub id; anything else is a local path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith("/")


def load_hubert_strict(name_or_dir: str | Path, what: str) -> HubertModel:
    """HubertModel.from_pretrained that never returns random weights: a missing tensor is an error."""
    name = str(name_or_dir)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{what}: {path} exists but has no config.json (not a save_pretrained dir); {HOW_TO_CREATE}"
            )
        source = str(path)
    elif _looks_like_hub_id(name):
        source = name
    else:
        raise FileNotFoundError(f"{what}: local model dir {path} does not exist; {HOW_TO_CREATE}")
    try:
        model, info = HubertModel.from_pretrained(source, output_loading_info=True)
    except OSError as exc:  # hub id not reachable / not cached, or unreadable files: name what failed and how to fix
        raise FileNotFoundError(f"{what}: cannot load HuBERT from {source!r} ({exc}); {HOW_TO_CREATE}") from exc
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise RuntimeError(
            f"{what}: {source} does not hold a complete HubertModel (missing {missing}, "
            f"mismatched {mismatched}); refusing to use randomly initialised weights"
        )
    return model.eval()


def hubert_num_frames(config: HubertConfig, num_samples: int) -> int:
    """Output length of HuBERT's conv feature encoder for `num_samples` input samples."""
    n = num_samples
    for k, s in zip(config.conv_kernel, config.conv_stride, strict=True):
        n = (n - k) // s + 1
    return max(n, 0)


class SSLFeatureExtractor(nn.Module):
    """wav (B, N) → hidden_states[layer] (B, T, D); layer 0 = encoder input (after feature projection)."""

    frame_rate = 50

    def __init__(self, model: HubertModel, layer: int):
        super().__init__()
        n = model.config.num_hidden_layers
        if not 0 <= layer <= n:
            raise ValueError(f"ssl.layer={layer} is out of range: this model has hidden states 0..{n} ({n} layers)")
        self.model = model
        self.layer = layer

    @classmethod
    def from_pretrained(cls, name_or_dir: str, layer: int) -> SSLFeatureExtractor:
        return cls(load_hubert_strict(name_or_dir, "ssl"), layer)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def num_frames(self, num_samples: int) -> int:
        return hubert_num_frames(self.model.config, num_samples)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() != 2:
            raise ValueError(f"expected wav (B, N), got shape {tuple(wav.shape)}")
        out = self.model(wav, output_hidden_states=True)
        return out.hidden_states[self.layer]


# No SpecAugment masking, no dropout: a teacher's features must be a deterministic function of the audio.
DETERMINISTIC = dict(
    mask_time_prob=0.0,
    mask_feature_prob=0.0,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
    layerdrop=0.0,
)


def tiny_hubert_config(
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 128,
    conv_dim: int = 32,
) -> HubertConfig:
    """A small HubertConfig with HuBERT's 7-layer conv stack (strides 5,2,2,2,2,2,2 → 320 samples per frame, 50 Hz)."""
    return HubertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        conv_dim=(conv_dim,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        # hubert-base layout: group norm in the feature encoder, post-norm transformer.
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        **DETERMINISTIC,
    )


def save_tiny_teacher(out_dir: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Random-init tiny HubertModel saved with save_pretrained: the demo's stand-in for facebook/hubert-base-ls960."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    model = HubertModel(tiny_hubert_config(**sizes)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def hubert_base_config() -> HubertConfig:
    """facebook/hubert-base-ls960's geometry, written out: 768-d, 12 layers of 12 heads (3072 feed-forward), the same
    7-layer conv front end (512 channels, strides 5,2,2,2,2,2,2, kernels 10,3,3,3,3,2,2, no bias, group norm) and
    positional conv (128 wide, 16 groups). Dropout and SpecAugment masking are off, as for every SIREN teacher: its
    features must be a deterministic function of the audio."""
    return HubertConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        conv_dim=(512,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_bias=False,
        feat_extract_norm="group",
        feat_proj_layer_norm=True,
        do_stable_layer_norm=False,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        **DETERMINISTIC,
    )


TEACHER_LIKES = {"tiny": tiny_hubert_config, "hubert-base": hubert_base_config}


def save_random_teacher(out_dir: str | Path, like: str = "tiny", seed: int = 0) -> Path:
    """A randomly initialised HubertModel with the geometry of `like` (`tiny`, or `hubert-base` for the real
    pipeline's shapes without a model hub), saved with save_pretrained so `ssl.name=OUT_DIR` loads it."""
    if like not in TEACHER_LIKES:
        from siren.errors import SirenError

        raise SirenError(f"init-ssl --like {like!r}: unknown teacher geometry; one of {', '.join(TEACHER_LIKES)}")
    out = Path(out_dir)
    torch.manual_seed(seed)
    model = HubertModel(TEACHER_LIKES[like]()).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out
