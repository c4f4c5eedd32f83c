from __future__ import annotations

import fnmatch

import pytest
import torch

from siren.models.factorizer import Factorizer


def make(input_dim=24, **kw) -> Factorizer:
    args = dict(
        input_dim=input_dim,
        hidden_dim=32,
        num_blocks=2,
        num_heads=4,
        kernel_size=7,
        sem_dim=12,
        pro_dim=6,
        spk_dim=10,
        dropout=0.0,
    )
    args.update(kw)
    return Factorizer(**args)


@pytest.mark.parametrize("t_in,t_sem,t_pro", [(96, 48, 12), (100, 48, 12), (8, 4, 1)])
def test_frame_rates(t_in, t_sem, t_pro):
    out = make()(torch.randn(3, t_in, 24))
    assert out.sem.shape == (3, t_sem, 12)  # 50 Hz → 25 Hz
    assert out.pro.shape == (3, t_pro, 6)  # 50 Hz → 6.25 Hz
    assert out.spk.shape == (3, 10)


def test_crop_to_multiple_of_eight_ignores_tail():
    f = make().eval()
    x = torch.randn(2, 96, 24)
    a = f(x)
    b = f(torch.cat([x, torch.randn(2, 7, 24)], dim=1))
    torch.testing.assert_close(a.sem, b.sem)
    torch.testing.assert_close(a.spk, b.spk)


def test_wrong_input_dim_and_too_short():
    f = make()
    with pytest.raises(ValueError, match="24"):
        f(torch.randn(1, 16, 20))
    with pytest.raises(ValueError, match="8"):
        f(torch.randn(1, 5, 24))


def test_speaker_submodules_selected_by_glob():
    names = [n for n, _ in make().named_children()]
    spk = [n for n in names if fnmatch.fnmatch(f"factorizer.{n}", "factorizer.speaker_*")]
    assert set(spk) == {"speaker_pool", "speaker_proj"}


def test_speaker_embedding_sees_the_whole_utterance():
    f = make().eval()
    x = torch.randn(1, 32, 24)
    x2 = x.clone()
    x2[:, -8:] = torch.randn(1, 8, 24)  # change only the last frames
    assert not torch.allclose(f(x).spk, f(x2).spk)


def test_gradients_reach_all_parameters():
    f = make()
    out = f(torch.randn(2, 32, 24))
    (out.sem.sum() + out.pro.sum() + out.spk.sum()).backward()
    assert [n for n, p in f.named_parameters() if p.grad is None] == []
