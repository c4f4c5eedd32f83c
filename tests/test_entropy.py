from __future__ import annotations

import math

import pytest
import torch

from siren.models.entropy import EntropyModel

STREAMS = {"sem": (81, 1), "pro": (9, 2)}


def make(**kw) -> EntropyModel:
    torch.manual_seed(0)
    args = dict(streams=STREAMS, dim=32, num_layers=2, num_heads=4, max_len=64, dropout=0.0)
    args.update(kw)
    return EntropyModel(**args).eval()


def random_codes(b=3, t_sem=10, t_pro=4):
    g = torch.Generator().manual_seed(1)
    return {
        "sem": torch.randint(0, 81, (b, t_sem, 1), generator=g),
        "pro": torch.randint(0, 9, (b, t_pro, 2), generator=g),
    }


def test_bits_match_reported_probabilities():
    em = make()
    codes = random_codes()
    res = em(codes)
    for s, c in codes.items():
        k = STREAMS[s][0]
        assert res.logits[s].shape == (*c.shape, k)
        assert (res.bits[s] >= 0).all()
        p = torch.softmax(res.logits[s].double(), -1).gather(-1, c[..., None]).squeeze(-1)
        torch.testing.assert_close(res.bits[s].double(), -torch.log2(p).sum(-1), atol=1e-4, rtol=1e-5)
    # the loss is the mean CE in nats over all (frame, level) entries
    n = sum(c.numel() for c in codes.values())
    total_bits = sum(res.bits[s].sum() for s in codes)
    assert res.loss.item() == pytest.approx(total_bits.item() * math.log(2) / n, rel=1e-5)


def test_next_probs_matches_forward():
    em = make()
    codes = random_codes()
    res = em(codes)
    for s, c in codes.items():
        for t in range(c.shape[1]):
            p = em.next_probs(s, c[:, :t])
            assert p.dtype == torch.float64 and p.shape == (c.shape[0], c.shape[2], STREAMS[s][0])
            torch.testing.assert_close(p, torch.softmax(res.logits[s][:, t].double(), -1), atol=1e-5, rtol=0)
            torch.testing.assert_close(p, em.next_probs(s, c[:, :t]), atol=0, rtol=0)  # deterministic


def test_causal_future_does_not_change_past():
    em = make()
    codes = random_codes()
    res = em(codes)
    changed = {k: v.clone() for k, v in codes.items()}
    changed["sem"][:, 6:] = (changed["sem"][:, 6:] + 1) % 81
    res2 = em(changed)
    torch.testing.assert_close(res.logits["sem"][:, :7], res2.logits["sem"][:, :7])
    assert not torch.allclose(res.logits["sem"][:, 7:], res2.logits["sem"][:, 7:])


def test_lengths_mask_total_bits_and_loss():
    em = make()
    codes = random_codes()
    lengths = {"sem": torch.tensor([10, 5, 1]), "pro": torch.tensor([4, 2, 1])}
    res = em(codes, lengths)
    for s in codes:
        for i, n in enumerate(lengths[s].tolist()):
            assert res.total_bits[s][i].item() == pytest.approx(res.bits[s][i, :n].sum().item(), rel=1e-5)
    full = em(codes)
    assert res.loss.item() != pytest.approx(full.loss.item())


def test_training_reduces_loss():
    em = make()
    em.train()
    codes = {"sem": torch.zeros(2, 12, 1, dtype=torch.long), "pro": torch.ones(2, 3, 2, dtype=torch.long)}
    opt = torch.optim.Adam(em.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss = em(codes).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_errors():
    em = make()
    with pytest.raises(KeyError, match="sem"):
        em.next_probs("nope", torch.zeros(1, 0, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        em({"sem": torch.zeros(1, 100, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match="2"):
        em({"pro": torch.zeros(1, 4, 1, dtype=torch.long)})
