"""`siren init-ssl --like hubert-base`: a random teacher with HuBERT-base's geometry, loadable as `ssl.name`."""

from __future__ import annotations

import torch

from siren.cli import main
from siren.models.ssl import SSLFeatureExtractor, load_hubert_strict


def test_hubert_base_like_teacher_has_the_real_geometry(tmp_path):
    """Saved through the CLI, loaded strictly (from_pretrained, every tensor present): 768-d, 12 layers of 12 heads,
    HuBERT-base's conv front end (320 samples a frame: 49 frames for 1 s at 16 kHz); one forward on 0.1 s gives the
    frames num_frames promises."""
    out = tmp_path / "hubert_base_like"
    assert main(["init-ssl", "--out", str(out), "--like", "hubert-base", "--seed", "3"]) == 0
    model = load_hubert_strict(out, "ssl")
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (768, 12, 12, 3072)
    assert tuple(c.conv_dim) == (512,) * 7 and tuple(c.conv_stride) == (5, 2, 2, 2, 2, 2, 2)
    assert tuple(c.conv_kernel) == (10, 3, 3, 3, 3, 2, 2) and c.conv_bias is False and c.feat_extract_norm == "group"
    assert (c.num_conv_pos_embeddings, c.num_conv_pos_embedding_groups) == (128, 16)
    assert c.mask_time_prob == 0.0 and c.layerdrop == 0.0  # features are a deterministic function of the audio
    assert 90e6 < sum(p.numel() for p in model.parameters()) < 100e6  # HuBERT-base: about 95M parameters
    fx = SSLFeatureExtractor(model, layer=12)
    assert fx.dim == 768 and fx.num_frames(16000) == 49
    with torch.no_grad():
        feats = fx(torch.randn(1, 1600))
    assert feats.shape == (1, fx.num_frames(1600), 768) and torch.isfinite(feats).all()


def test_default_is_still_the_tiny_teacher_and_unknown_geometry_is_an_error(tmp_path, capsys):
    assert main(["init-ssl", "--out", str(tmp_path / "tiny")]) == 0
    assert load_hubert_strict(tmp_path / "tiny", "ssl").config.hidden_size == 64
    assert main(["init-ssl", "--out", str(tmp_path / "x"), "--like", "hubert-large"]) == 2
    err = capsys.readouterr().err
    assert "hubert-large" in err and "hubert-base" in err and not (tmp_path / "x").exists()
