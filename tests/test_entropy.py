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


def test_cached_coder_matches_forward_inside_the_context():
    em = make()
    codes = random_codes()
    res = em(codes)
    for s, c in codes.items():
        inc = em.stream_logits(s, c)  # frame by frame through the key/value cache
        assert inc.shape == res.logits[s].shape
        torch.testing.assert_close(inc, res.logits[s], atol=1e-5, rtol=0)
        torch.testing.assert_close(inc, em.stream_logits(s, c), atol=0, rtol=0)  # deterministic


@pytest.mark.parametrize("rope_block", [1024, 4])
def test_sliding_context_keeps_distances_and_the_bos(rope_block, monkeypatch):
    """Past max_len, frame t sees [BOS, last max_len − 1 frames] at the same relative distances as a training segment
    starting there. With one layer the cached keys are exactly those of that segment, so the logits must match.
    A rotation-table block smaller than the window exercises the tables' turnover."""
    from siren.models.entropy import StreamCoder

    monkeypatch.setattr(StreamCoder, "ROPE_BLOCK", rope_block)
    W = 8
    em = make(num_layers=1, max_len=W)
    c = random_codes(b=2, t_sem=40)["sem"]
    inc = em.stream_logits("sem", c)
    lm = em.streams["sem"]
    for t in range(W, 40):
        window = lm.logits_for_next(c[:, t - (W - 1) : t])[:, -1]
        torch.testing.assert_close(inc[:, t], window, atol=1e-5, rtol=0)


def test_encoder_run_is_bit_identical_to_the_decoders_frame_by_frame_path():
    """The encoder scores a known stream with `run`, the decoder with `logits`/`push`: the same floats, bit for bit,
    inside and past the context. Negative control: the one-pass forward (batched matrix products) is close but not
    bit-identical, so identity is a property of the shared path, not of the arithmetic."""
    em = make(max_len=8)
    c = random_codes(b=1, t_sem=30)["sem"]
    enc = em.coder("sem").run(c)
    dec = em.coder("sem")
    for t in range(c.shape[1]):
        assert torch.equal(dec.logits(), enc[:, t]), f"frame {t}"
        dec.push(c[:, t])
    batched = em.streams["sem"].logits_for_next(c[:, :7])
    torch.testing.assert_close(batched, enc[:, :8], atol=1e-5, rtol=0)
    assert not torch.equal(batched, enc[:, :8])
    with pytest.raises(RuntimeError, match="fresh"):
        dec.run(c)


@pytest.mark.parametrize("sizes", [(1, 29), (7, 0, 7, 7, 9), (1,) * 30])
def test_run_in_windows_is_bit_identical_to_one_run(sizes):
    """An encoder's windows: consecutive `run` calls give the floats of one `run` over the whole stream, bit for bit,
    inside and past the context; a decoder's `push` can take over after them."""
    em = make(max_len=8)
    c = random_codes(b=1, t_sem=31)["sem"]
    whole = em.coder("sem").run(c[:, :30])
    coder, parts, a = em.coder("sem"), [], 0
    for n in sizes:
        parts.append(coder.run(c[:, a : a + n]))
        a += n
    assert torch.equal(torch.cat(parts, 1), whole)
    dec = em.coder("sem")
    for t in range(30):
        dec.push(c[:, t])
    coder.push(c[:, 29])  # the frame the last window held back
    assert torch.equal(coder.logits(), dec.logits())
    with pytest.raises(RuntimeError, match="fresh"):
        coder.run(c[:, 30:])


def test_training_on_segments_longer_than_the_window_sees_the_coders_attention():
    """A training pass over a stream longer than max_len uses the sliding window of `StreamCoder`, in every layer
    (each token's deeper keys come from its own window): the logits agree with the coder's. Negative control: plain
    causal attention over the whole segment (what training without the window would do) does not."""
    em = make(max_len=8)
    c = random_codes(b=2, t_sem=30)["sem"]
    lm = em.streams["sem"]
    sliding = lm.logits_for_next(c[:, :-1])
    torch.testing.assert_close(sliding, em.stream_logits("sem", c), atol=1e-5, rtol=0)
    lm.max_len = 64  # the same weights with a context that covers the segment: full causal attention
    assert not torch.allclose(lm.logits_for_next(c[:, :-1])[:, 8:], sliding[:, 8:], atol=1e-3)
    lm.max_len = 8
    em.train()
    res = em({"sem": c})
    res.loss.backward()
    assert torch.isfinite(res.loss) and lm.blocks[0].qkv.weight.grad.abs().sum() > 0


def test_no_length_limit_and_linear_cache():
    em = make(max_len=16)
    c = random_codes(b=1, t_sem=200)["sem"]
    res = em({"sem": c})  # eval mode: longer than the context → frame by frame
    assert res.bits["sem"].shape == (1, 200) and torch.isfinite(res.bits["sem"]).all()
    coder = em.coder("sem")
    for t in range(200):
        coder.push(c[:, t])
    assert coder.keys.shape[3] == 16  # the cache never grows past the BOS + max_len − 1 frames


def test_old_format_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    from siren.models.io import StrictLoadError, load_component

    em = make()
    old = {k: v for k, v in em.state_dict().items()}
    old["streams.sem.pos.weight"] = torch.zeros(64, 32)
    save_file(old, str(tmp_path / "em.safetensors"))
    with pytest.raises(StrictLoadError, match="format 1"):
        load_component(make(), tmp_path / "em.safetensors")


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
        em.coder("nope")
    with pytest.raises(ValueError, match="2"):
        em({"pro": torch.zeros(1, 4, 1, dtype=torch.long)})
