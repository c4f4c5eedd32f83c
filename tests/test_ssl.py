from __future__ import annotations

import pytest
import torch

from siren.models.ssl import SSLFeatureExtractor, save_tiny_teacher
from siren.models.student_ssl import TinyHubert

SIZES = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, conv_dim=16)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny_hubert", seed=0, **SIZES)


def test_tiny_teacher_round_trip(teacher_dir):
    wav = torch.randn(2, 16000)
    a = SSLFeatureExtractor.from_pretrained(str(teacher_dir), layer=2).eval()
    b = SSLFeatureExtractor.from_pretrained(str(teacher_dir), layer=2).eval()
    with torch.no_grad():
        fa, fb = a(wav), b(wav)
    assert fa.shape == (2, a.num_frames(16000), 32) and a.dim == 32
    assert a.num_frames(16000) == 49  # HuBERT conv stack: 50 Hz minus the receptive-field edge
    torch.testing.assert_close(fa, fb, atol=0, rtol=0)
    # a different seed gives different weights: loading really reads the saved ones
    other = save_tiny_teacher(teacher_dir.parent / "other", seed=1, **SIZES)
    with torch.no_grad():
        assert not torch.allclose(SSLFeatureExtractor.from_pretrained(str(other), 2)(wav), fa)


def test_layers_differ_and_range_checked(teacher_dir):
    wav = torch.randn(1, 8000)
    with torch.no_grad():
        f0 = SSLFeatureExtractor.from_pretrained(str(teacher_dir), 0)(wav)
        f2 = SSLFeatureExtractor.from_pretrained(str(teacher_dir), 2)(wav)
    assert not torch.allclose(f0, f2)
    with pytest.raises(ValueError, match="0..2"):
        SSLFeatureExtractor.from_pretrained(str(teacher_dir), 3)


def test_missing_ssl_dir_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "tiny_hubert"
    with pytest.raises(FileNotFoundError) as err:
        SSLFeatureExtractor.from_pretrained(str(missing), 1)
    assert str(missing) in str(err.value) and "init-ssl" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        SSLFeatureExtractor.from_pretrained(str(empty), 1)


def test_incomplete_weights_are_refused(teacher_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(teacher_dir, broken)
    weights = broken / "model.safetensors"
    tensors = load_file(str(weights))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="random"):
        SSLFeatureExtractor.from_pretrained(str(broken), 1)


def test_tiny_hubert_round_trip(tmp_path):
    torch.manual_seed(0)
    student = TinyHubert.from_config(teacher_dim=40, **SIZES).eval()
    assert student.dim == 40
    wav = torch.randn(2, 8000)
    with torch.no_grad():
        out = student(wav)
    assert out.shape == (2, student.num_frames(8000), 40)
    student.save_pretrained(tmp_path / "student")
    loaded = TinyHubert.from_pretrained(tmp_path / "student").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(wav), out, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="missing_student"):
        TinyHubert.from_pretrained(tmp_path / "missing_student")
