"""Entropy model: a small causal transformer LM per code stream; bits per frame and probabilities for the range coder.

Positions are rotary (RoPE), so attention depends only on the distance between frames and nothing limits the length of
a stream. `max_len` is the attention context in frames (the learned BOS included): a frame sees at most the
`max_len − 1` frames before it. Training segments shorter than that are plain causal attention; longer streams slide
the window, with the BOS kept as the first entry of every window (so each window looks like the start of a training
segment). The range coder uses `StreamCoder`: one frame at a time with a key/value cache, linear in the stream length,
and the same code path at encode and decode time so both see identical probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from siren.models.precision import fp32_island

# Version of the entropy model's parameterisation. 1: learned absolute positions (`streams.*.pos.weight`, limited to
# max_len frames); 2: rotary positions and a sliding context. A version-1 state dict cannot be loaded (see
# `explain_load_failure`); the codec stage must be retrained (or its entropy model alone, with the rest frozen).
FORMAT_VERSION = 2
ROPE_BASE = 10000.0


@dataclass
class EntropyResult:
    """Per stream: logits (B, T, L, K), bits (B, T) per frame, total_bits (B,) over valid frames; loss: mean CE (nats)."""

    logits: dict[str, torch.Tensor]
    bits: dict[str, torch.Tensor]
    loss: torch.Tensor
    total_bits: dict[str, torch.Tensor]


def rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (N,) long → cos, sin (N, head_dim // 2) float32, computed in float64 so large positions stay exact."""
    half = head_dim // 2
    inv = ROPE_BASE ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = positions.to(torch.float64)[:, None] * inv[None]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., N, head_dim) rotated pairwise (first half, second half) by cos/sin (N, head_dim // 2)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class CausalBlock(nn.Module):
    """Pre-norm transformer block with causal rotary self-attention. x (B, T, D) → (B, T, D)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"entropy model dim {dim} is not divisible by num_heads {num_heads}")
        if (dim // num_heads) % 2:
            raise ValueError(f"entropy model head dim {dim // num_heads} must be even for rotary positions")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """`window` (the context in tokens, BOS included): None when the whole sequence fits in it (plain causal
        attention); otherwise token t sees the BOS, rotated to the window's start, and the last window − 1 tokens."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout.p if self.training else 0.0
        if window is None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            h = self._sliding_attention(q, k, v, cos, sin, window, p)
        x = x + self.dropout(self.proj(h.transpose(1, 2).reshape(b, t, d)))
        return x + self.dropout(self.mlp(self.norm2(x)))

    @staticmethod
    def _sliding_attention(q, k, v, cos, sin, window: int, dropout_p: float) -> torch.Tensor:
        """q, k, v (B, H, T, hd) unrotated; token 0 is the BOS → (B, H, T, hd): the attention `StreamCoder` computes
        past its context, for all tokens at once (training on segments longer than the window)."""
        T, slots = q.shape[2], window - 1
        pos = torch.arange(T, device=q.device)
        start = (pos - slots).clamp_min(0)  # where each token's window starts: the BOS key is rotated there
        q_r, k_r = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_bos = apply_rope(k[:, :, :1].expand_as(k), cos[start], sin[start])  # (B, H, T, hd): one per query
        s_bos = (q_r * k_bos).sum(-1, keepdim=True)
        s_tok = q_r @ k_r[:, :, 1:].transpose(-1, -2)  # (B, H, T, T − 1): scores against tokens 1..T−1
        j = pos[1:]
        visible = (j[None] <= pos[:, None]) & (j[None] > pos[:, None] - slots)
        s_tok = s_tok.masked_fill(~visible, float("-inf"))
        att = torch.softmax(torch.cat([s_bos, s_tok], -1) / math.sqrt(q.shape[-1]), dim=-1)
        att = F.dropout(att, dropout_p) if dropout_p else att
        return att[..., :1] * v[:, :, :1] + att[..., 1:] @ v[:, :, 1:]


class StreamLM(nn.Module):
    """One stream: frame t sees the sum of the L code embeddings of frame t−1 (a learned BOS at t=0)."""

    def __init__(
        self,
        codebook_size: int,
        num_levels: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        max_len: int,
        dropout: float,
    ):
        super().__init__()
        if max_len < 2:
            raise ValueError(f"entropy model max_len (attention context in frames) must be >= 2, got {max_len}")
        self.codebook_size, self.num_levels, self.max_len = codebook_size, num_levels, max_len
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.embed = nn.ModuleList(nn.Embedding(codebook_size, dim) for _ in range(num_levels))
        self.bos = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList(CausalBlock(dim, num_heads, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_levels * codebook_size)
        nn.init.normal_(self.bos, std=0.02)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., L) → (..., D): the sum of the per-level embeddings."""
        return sum(self.embed[i](codes[..., i]) for i in range(self.num_levels))

    def logits_for_next(self, prev: torch.Tensor) -> torch.Tensor:
        """prev (B, P, L): codes of frames 0..P−1 → logits (B, P+1, L, K) for frames 0..P, all in one pass.

        Streams longer than the context (P + 1 > max_len) get the sliding window `StreamCoder` uses, so a model trained
        on segments longer than its window has seen the attention pattern of long-audio coding.
        """
        b, p, _ = prev.shape
        x = self.bos.expand(b, 1, -1)
        if p:
            x = torch.cat([x, self.embed_codes(prev)], dim=1)
        cos, sin = rope_tables(torch.arange(p + 1), self.head_dim)
        cos, sin = cos.to(x.device), sin.to(x.device)
        window = self.max_len if p + 1 > self.max_len else None
        for block in self.blocks:
            x = block(x, cos, sin, window)
        return self.head(self.norm(x)).view(b, p + 1, self.num_levels, self.codebook_size)


class StreamCoder:
    """Incremental next-frame logits for one stream, with a key/value cache: cost per frame is O(context).

    `logits()` gives (B, L, K) float32 for the next frame; `push(codes (B, L))` appends that frame; `run(codes)` scores
    a known stream, whole or window by window, with the same per-frame operations (see its docstring). The range
    coder's encoder (`run`) and decoder (`logits`/`push`) therefore compute every frame's probabilities with the same
    operations, on the same shapes, from the same inputs: identical by construction (a test checks it bit for bit).
    Inside the context this equals `logits_for_next` up to float rounding. Past it, the window slides
    as in sliding-window attention: each layer attends to its cached keys/values of the last `max_len − 1` frames plus
    the BOS, whose key is rotated to the window's start so it keeps its trained distance.

    The step is written for speed at batch 1 (about 20 tensor operations per layer): weights are bound once, the BOS
    sits in entry 0 of the cache so attention is one `scaled_dot_product_attention`, rotations are looked up in
    per-block tables that depend only on the absolute position, and everything runs under `torch.inference_mode`.
    """

    ROPE_BLOCK = 1024  # positions per rotation table; a block's values depend only on its index

    def __init__(self, lm: StreamLM, batch: int = 1, device: torch.device | str = "cpu"):
        self.lm, self.batch = lm, batch
        self.device = torch.device(device)
        self.t = 0  # index of the next input token (0 = BOS, token j holds the codes of frame j − 1)
        self._held: torch.Tensor | None = None  # `run`'s last frame: its logits are out, it is not in the cache yet
        n, H, hd = len(lm.blocks), lm.num_heads, lm.head_dim
        self.slots = lm.max_len - 1  # frame entries in the cache; a ring buffer (attention ignores key order)
        self.dim, self.levels, self.K = H * hd, lm.num_levels, lm.codebook_size
        with torch.inference_mode():
            # One weight list per block, bound once (a module attribute lookup costs as much as a small kernel).
            self.layers = [
                (
                    b.norm1.weight, b.norm1.bias, b.norm1.eps, b.qkv.weight, b.qkv.bias, b.proj.weight, b.proj.bias,
                    b.norm2.weight, b.norm2.bias, b.norm2.eps, b.mlp[0].weight, b.mlp[0].bias, b.mlp[2].weight,
                    b.mlp[2].bias,
                )
                for b in lm.blocks
            ]  # fmt: skip
            self.final = (lm.norm.weight, lm.norm.bias, lm.norm.eps, lm.head.weight, lm.head.bias)
            # All levels' embeddings in one table: frame codes (B, L) → rows codes + level · K, summed over L.
            self.embed = torch.cat([e.weight for e in lm.embed]).to(self.device)
            self.offsets = torch.arange(lm.num_levels, device=self.device) * lm.codebook_size
            # Keys/values per block: entry 0 is the BOS, entries 1.. a ring buffer of frames. Keys are stored rotated
            # at their absolute positions, so a query at position t sees distance t − j.
            # Never read before written (attention sees entries 0 .. min(t, slots) only), so left uninitialised.
            self.keys = torch.empty(n, batch, H, self.slots + 1, hd, device=self.device)
            self.values = torch.empty(n, batch, H, self.slots + 1, hd, device=self.device)
            # The BOS keys unrotated: re-rotated to the window's start once it slides.
            self.bos_k = torch.zeros(n, batch, H, hd, device=self.device)
            self.inv_freq = ROPE_BASE ** (-torch.arange(hd // 2, dtype=torch.float64) / (hd // 2))
            self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            self._next = self._step(lm.bos.to(self.device).expand(batch, -1))

    def logits(self) -> torch.Tensor:
        return self._next

    def push(self, codes: torch.Tensor) -> None:
        """codes (B, L) long: the frame whose logits `logits()` just gave."""
        if codes.shape != (self.batch, self.levels):
            raise ValueError(f"expected codes ({self.batch}, {self.levels}), got {tuple(codes.shape)}")
        with torch.inference_mode():
            self._next = self._step(self._embed(codes.to(self.device)))
        self._held = None  # the caller pushed the frame `run` held back, or the coder was never run

    def run(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T, L): the stream's next T frames → logits (B, T, L, K) float32, frame t from frames < t: exactly
        the `logits()` a decoder gets when it `push`es the same frames one by one.

        Call it on a fresh coder with the whole stream, or with consecutive windows of it (an encoder whose memory must
        not grow with the stream's length): each call continues where the previous one stopped. The last frame of a
        call is held back (its logits are known, nothing needs it yet) and enters the cache first in the next call.

        The per-frame operations are those of `push`, with the same shapes and inputs, in the same order within each
        frame and within each layer's cache; only the loops are swapped (layer outside, frame inside), so one layer's
        weights stay in the CPU cache while every frame goes through it (a few per cent faster on a 2-core machine).
        That cannot change a bit: no operation sees another frame's data other than through the cache, which each
        layer fills in the same order either way."""
        continuing = self._held is not None
        if self.t != 1 and not continuing:
            raise RuntimeError("StreamCoder.run needs a fresh coder, or one that has only run (frames were pushed)")
        if codes.dim() != 3 or codes.shape[0] != self.batch or codes.shape[2] != self.levels:
            raise ValueError(f"expected codes ({self.batch}, T, {self.levels}), got {tuple(codes.shape)}")
        b, T = codes.shape[0], codes.shape[1]
        out = torch.empty(b, T, self.levels, self.K)
        if T == 0:
            return out
        with torch.inference_mode():
            codes = codes.to(self.device)
            # Tokens to add: the held frame (its output is this window's first logits), then every frame but the last.
            frames = ([self._held] if continuing else []) + [codes[:, j] for j in range(T - 1)]
            first = 0 if continuing else 1  # a fresh coder's first logits are the BOS output, already computed
            if not continuing:
                out[:, 0] = self._next
            t0 = self.t
            xs = [self._embed(f)[:, None] for f in frames]
            ropes = [self._ropes(t0 + j) for j in range(len(frames))]
            for i in range(len(self.layers)):
                for j in range(len(frames)):
                    xs[j] = self._layer(i, xs[j], t0 + j, ropes[j])
            for j in range(len(frames)):
                out[:, first + j] = self._head(xs[j])
        self.t = t0 + len(frames)
        self._next = out[:, -1].clone()
        self._held = codes[:, -1].clone()
        return out

    def _rope(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos (hd,) and signed sin (hd,) for one position: rotate(x) = x · cos + swap_halves(x) · sin."""
        blk, i = divmod(pos, self.ROPE_BLOCK)
        if blk not in self._tables:
            p = torch.arange(blk * self.ROPE_BLOCK, (blk + 1) * self.ROPE_BLOCK, dtype=torch.float64)
            ang = p[:, None] * self.inv_freq[None]
            c, s = ang.cos().float(), ang.sin().float()
            self._tables[blk] = (torch.cat([c, c], 1).to(self.device), torch.cat([-s, s], 1).to(self.device))
            for old in [k for k in self._tables if k < blk - 1 - self.slots // self.ROPE_BLOCK]:
                del self._tables[old]  # positions only grow: the window's start never goes back
        c, s = self._tables[blk]
        return c[i], s[i]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.addcmul(x * cos, x.roll(half, -1), sin)

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, L) → (B, D): the sum of the per-level embeddings."""
        return self.embed[codes + self.offsets].sum(1)

    def _ropes(self, t: int) -> tuple:
        """Rotations for token t and, once the window slides, for the BOS at the window's start."""
        start = t - self.slots
        return (*self._rope(t), *(self._rope(start) if start > 0 else (None, None))) if t else None

    def _layer(self, i: int, x: torch.Tensor, t: int, ropes: tuple | None) -> torch.Tensor:
        """Block i on token t: x (B, 1, D) → (B, 1, D), writing the token's key/value into the block's cache."""
        w1, b1, e1, wqkv, bqkv, wp, bp, w2, b2, e2, wf1, bf1, wf2, bf2 = self.layers[i]
        b, d, H, hd = x.shape[0], self.dim, self.lm.num_heads, self.lm.head_dim
        h = F.layer_norm(x, (d,), w1, b1, e1)
        qkv = F.linear(h, wqkv, bqkv).view(b, 3, H, hd)
        if t == 0:  # the BOS: position 0 (no rotation) and attends to itself only
            self.bos_k[i] = qkv[:, 1]
            self.keys[i, :, :, 0] = qkv[:, 1]
            self.values[i, :, :, 0] = qkv[:, 2]
            o = qkv[:, 2]  # softmax over a single key
        else:
            cos, sin, cos0, sin0 = ropes
            qk = self._rotate(qkv[:, :2], cos, sin)  # (B, 2, H, hd)
            slot = 1 + (t - 1) % self.slots
            self.keys[i, :, :, slot] = qk[:, 1]
            self.values[i, :, :, slot] = qkv[:, 2]
            if cos0 is not None:  # the window slides: the BOS key moves to its start
                self.keys[i, :, :, 0] = self._rotate(self.bos_k[i], cos0, sin0)
            n_keys = 1 + min(t, self.slots)  # the BOS + the frame entries visible to this token
            o = F.scaled_dot_product_attention(
                qk[:, 0, :, None], self.keys[i, :, :, :n_keys], self.values[i, :, :, :n_keys]
            )[:, :, 0]
        x = x + F.linear(o.reshape(b, 1, d), wp, bp)
        h = F.layer_norm(x, (d,), w2, b2, e2)
        return x + F.linear(F.gelu(F.linear(h, wf1, bf1)), wf2, bf2)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, D) after the last block → logits (B, L, K) float32."""
        wn, bn, en, wh, bh = self.final
        out = F.linear(F.layer_norm(x, (self.dim,), wn, bn, en), wh, bh)
        return out.view(x.shape[0], self.levels, self.K).float()

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) input token at index self.t → logits (B, L, K) for the frame after it. Call in inference mode."""
        t, ropes = self.t, self._ropes(self.t)
        x = x[:, None]  # (B, 1, D)
        for i in range(len(self.layers)):
            x = self._layer(i, x, t, ropes)
        self.t += 1
        return self._head(x)


class EntropyModel(nn.Module):
    """Causal LMs over code streams. `streams` maps name ("sem", "pro") → (codebook_size, num_levels).

    `max_len` is the attention context in frames (BOS included); stream length is unlimited.
    """

    format_version = FORMAT_VERSION

    def __init__(
        self,
        streams: dict[str, tuple[int, int]],
        dim: int,
        num_layers: int,
        num_heads: int,
        max_len: int,
        dropout: float,
    ):
        super().__init__()
        self.layout = {name: (int(k), int(n)) for name, (k, n) in streams.items()}
        self.dropout = dropout
        self.max_len = max_len
        self.streams = nn.ModuleDict(
            {name: StreamLM(k, n, dim, num_layers, num_heads, max_len, dropout) for name, (k, n) in self.layout.items()}
        )

    def _check(self, stream: str, codes: torch.Tensor) -> StreamLM:
        if stream not in self.streams:
            raise KeyError(f"entropy model has no stream {stream!r}; it has {sorted(self.streams)}")
        lm = self.streams[stream]
        if codes.dim() != 3 or codes.shape[-1] != lm.num_levels:
            raise ValueError(f"stream {stream!r}: expected codes (B, T, {lm.num_levels}), got {tuple(codes.shape)}")
        return lm

    def coder(self, stream: str, batch: int = 1) -> StreamCoder:
        """An incremental next-frame logits source for `stream` (needs eval mode: dropout would break determinism)."""
        if stream not in self.streams:
            raise KeyError(f"entropy model has no stream {stream!r}; it has {sorted(self.streams)}")
        if self.training and self.dropout > 0:
            raise RuntimeError("the range coder needs deterministic outputs: call entropy_model.eval() first")
        return StreamCoder(self.streams[stream], batch, next(self.parameters()).device)

    @torch.no_grad()
    def stream_logits(self, stream: str, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T, L) → logits (B, T, L, K) for each frame given the frames before it, frame by frame (any T)."""
        self._check(stream, codes)
        return self.coder(stream, codes.shape[0]).run(codes)

    @fp32_island
    def forward(self, codes: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor] | None = None) -> EntropyResult:
        """codes[s] (B, T, L) long; lengths[s] (B,) valid frames (all frames when None).

        In eval mode, streams longer than the context are scored frame by frame with the sliding window (no gradient).
        """
        logits, bits, total_bits = {}, {}, {}
        ce_sum, count = None, 0
        for name, c in codes.items():
            lm = self._check(name, c)
            b, t, n_levels = c.shape
            if t > lm.max_len and not self.training:
                lg = self.stream_logits(name, c)
            else:
                lg = lm.logits_for_next(c[:, :-1])  # (B, T, L, K): frame t predicted from frames < t
            logp = F.log_softmax(lg.float(), dim=-1).gather(-1, c[..., None]).squeeze(-1)  # (B, T, L)
            bits[name] = -logp.sum(-1) / math.log(2)
            if lengths is not None and name in lengths:
                valid = torch.arange(t, device=c.device)[None, :] < lengths[name].to(c.device)[:, None]
            else:
                valid = torch.ones(b, t, dtype=torch.bool, device=c.device)
            vf = valid.to(logp.dtype)
            total_bits[name] = (bits[name] * vf).sum(1)
            nll = -(logp.sum(-1) * vf).sum()
            ce_sum = nll if ce_sum is None else ce_sum + nll
            count = count + vf.sum() * n_levels
            logits[name] = lg
        if ce_sum is None:
            raise ValueError("entropy model got no code streams")
        loss = ce_sum / torch.as_tensor(count, dtype=ce_sum.dtype).clamp_min(1)
        return EntropyResult(logits=logits, bits=bits, loss=loss, total_bits=total_bits)

    def explain_load_failure(self, missing: set[str], unexpected: set[str]) -> str | None:
        """A sentence for a strict-load failure caused by an older parameterisation (see FORMAT_VERSION)."""
        if any(n.endswith(".pos.weight") for n in unexpected):
            return (
                "this entropy model was saved by an older SIREN (entropy-model format 1: learned absolute positions, "
                f"streams limited to max_len frames); this SIREN reads format {FORMAT_VERSION} (rotary positions, "
                "no length limit). Retrain the codec stage, or train a new entropy model on the old codes with the "
                "other components frozen (`trainable: [entropy_model]`)."
            )
        return None
