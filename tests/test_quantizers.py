from __future__ import annotations

import math

import pytest
import torch

from siren.models.quantizers import FSQ, ProductQuantizer, ResidualFSQ


@pytest.mark.parametrize("levels", [[3, 3, 3, 3], [8, 5, 5, 5], [4, 6]])
def test_fsq_round_trip_and_range(levels):
    fsq = FSQ(levels)
    z = torch.randn(5, 7, len(levels)) * 3
    q, idx = fsq(z)
    assert idx.dtype == torch.long and idx.shape == (5, 7)
    assert idx.min() >= 0 and idx.max() < fsq.codebook_size == math.prod(levels)
    assert q.abs().max() <= 1.0
    torch.testing.assert_close(fsq.indices_to_codes(idx), q, atol=1e-6, rtol=0)
    # each dim takes at most `levels[i]` distinct values
    for i, lv in enumerate(levels):
        assert q[..., i].unique().numel() <= lv


def test_fsq_all_codes_reachable_and_distinct():
    fsq = FSQ([3, 4])
    codes = fsq.indices_to_codes(torch.arange(fsq.codebook_size))
    assert torch.unique(codes, dim=0).shape[0] == fsq.codebook_size
    # every index is reachable from some input, and quantizing a code's own grid point is a fixed point
    q, idx = fsq(torch.randn(20000, 2, generator=torch.Generator().manual_seed(0)) * 3)
    assert set(idx.tolist()) == set(range(fsq.codebook_size))
    q2, idx2 = fsq(
        torch.atanh(
            (q * fsq._half_width + torch.where(fsq._levels % 2 == 0, 0.5, 0.0)) / ((fsq._levels - 1) * 1.001 / 2)
        )
        - torch.atanh(torch.where(fsq._levels % 2 == 0, 0.5, 0.0) / ((fsq._levels - 1) * 1.001 / 2))
    )
    assert torch.equal(idx2, idx)


def test_fsq_straight_through_round_is_identity():
    fsq = FSQ([3, 5, 4])
    z = torch.randn(6, 3, requires_grad=True)
    g = torch.randn(6, 3)
    (fsq(z)[0] * g).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (fsq.bound(z2) / fsq._half_width * g).sum().backward()
    assert z.grad.abs().sum() > 0
    torch.testing.assert_close(z.grad, z2.grad)


@pytest.mark.parametrize("num_residual", [1, 3])
def test_residual_fsq_round_trip(num_residual):
    torch.manual_seed(0)
    rq = ResidualFSQ(dim=16, levels=[3, 3, 3, 3], num_residual=num_residual)
    x = torch.randn(2, 11, 16)
    res = rq(x)
    assert res.quantized.shape == x.shape
    assert res.codes.shape == (2, 11, num_residual) and res.codes.dtype == torch.long
    assert res.codes.min() >= 0 and res.codes.max() < rq.codebook_size == 81
    assert res.commit_loss.dim() == 0
    assert rq.num_levels == rq.num_codebooks == num_residual
    assert rq.bits_per_code == pytest.approx(math.log2(81))
    torch.testing.assert_close(rq.decode_codes(res.codes), res.quantized, atol=1e-5, rtol=0)


def test_residual_levels_reduce_error():
    torch.manual_seed(0)
    x = torch.randn(4, 50, 8)
    errs = []
    for n in (1, 2, 3):
        rq = ResidualFSQ(8, [5, 5, 5], n)
        torch.manual_seed(1)
        rq.in_proj.reset_parameters()
        z = rq.in_proj(x)
        errs.append((z - rq.codes_to_latent(rq(x).codes)).abs().mean().item())
    assert errs[0] > errs[1] > errs[2]


def test_residual_fsq_gradients_flow_to_input():
    rq = ResidualFSQ(8, [3, 3, 3, 3], 2)
    x = torch.randn(2, 5, 8, requires_grad=True)
    rq(x).quantized.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert rq.in_proj.weight.grad.abs().sum() > 0


def test_product_quantizer_round_trip_and_straight_through():
    torch.manual_seed(0)
    pq = ProductQuantizer(dim=32, groups=4, codebook_size=16)
    x = torch.randn(5, 32, requires_grad=True)
    res = pq(x)
    assert res.codes.shape == (5, 4) and res.codes.dtype == torch.long
    assert res.codes.min() >= 0 and res.codes.max() < 16
    torch.testing.assert_close(pq.decode_codes(res.codes), res.quantized, atol=1e-6, rtol=0)
    assert pq.bits_per_utterance == 4 * 4 and pq.num_codebooks == 4
    g = torch.randn(5, 32)
    (res.quantized * g).sum().backward()
    torch.testing.assert_close(x.grad, g)


def test_product_quantizer_picks_nearest_code():
    pq = ProductQuantizer(dim=4, groups=2, codebook_size=8)
    x = torch.randn(3, 4)
    codes = pq(x).codes
    for g in range(2):
        d = torch.cdist(x[:, 2 * g : 2 * g + 2], pq.codebooks[g].detach())
        assert torch.equal(codes[:, g], d.argmin(-1))


def test_product_quantizer_commit_loss_trains_codebook():
    pq = ProductQuantizer(dim=8, groups=2, codebook_size=4)
    res = pq(torch.randn(6, 8))
    res.commit_loss.backward()
    assert pq.codebooks.grad.abs().sum() > 0
