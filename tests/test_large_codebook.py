"""Large implicit codebooks: the codebook window's sparse storage gives the dense storage's metrics and JS drift, the
window picks it by codebook size, FSQ digit metrics follow the quantizer's own codes, memory does not grow with
window × codebook, and a tiny codec trains with a 2^16-code FSQ level."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from siren.metrics.codebook import DENSE_MAX_CODES, CodebookWindow, entropy_bits
from siren.metrics.drift import DriftReference
from siren.models.quantizers import ResidualFSQ
from siren.train.stages.base import MetricSources, StepOutput
from siren.train.step_metrics import StepMetrics
from tests import mechanisms

LAYOUT = {"sem": (81, 2), "pro": (27, 1), "spk": (16, 4)}
DIGITS = {"sem": [3, 3, 3, 3], "pro": [3, 3, 3]}


def _step(g: torch.Generator, layout=LAYOUT, B=3, T=10):
    (ks, ls), (kp, lp), (kk, lk) = layout["sem"], layout["pro"], layout["spk"]
    span = 5 + int(torch.randint(0, ks - 5, (1,), generator=g))  # a varying part of the codebook in use
    sem = torch.randint(0, ks, (B, T, ls), generator=g) % span
    pro = torch.randint(0, kp, (B, 3, lp), generator=g)
    spk = torch.randint(0, kk, (B, lk), generator=g)
    return {"sem": (sem, torch.rand(B, T, generator=g) > 0.2), "pro": (pro, None), "spk": (spk, None)}


def _profile(layout, g):
    counts = {s: torch.randint(0, 5, (L, K), generator=g).to(torch.float64) for s, (K, L) in layout.items()}
    return {
        "layout": {s: list(v) for s, v in layout.items()},
        "histograms": {s: h.tolist() for s, h in counts.items()},
        "bps_entropy": 10.0,
    }


def _same(got: dict, want: dict, atol: float = 1e-9) -> None:
    assert list(got) == list(want)
    bad = {k: (got[k], want[k]) for k in want if abs(got[k] - want[k]) > atol}
    assert not bad, bad


@pytest.mark.parametrize("backend", ["numpy", "torch"])  # host arrays (CPU training) / device tensors (accelerators)
def test_sparse_storage_equals_dense_storage_and_drift_through_evictions(backend):
    g = torch.Generator().manual_seed(0)
    ref = DriftReference(_profile(LAYOUT, g), LAYOUT)
    dense = CodebookWindow(LAYOUT, window=4, digits=DIGITS, drift=ref, storage="dense")
    sparse = CodebookWindow(LAYOUT, window=4, digits=DIGITS, drift=ref, storage="sparse", backend=backend)
    assert sparse._counts.host is (backend == "numpy")
    for _ in range(7):  # more steps than the window: evictions happen
        codes = _step(g)
        d, s = dense.step(codes, 12.0), sparse.step(codes, 12.0)
        _same(s, d)
        assert {"drift/sem/js", "drift/bps_delta", "codebook/pro/l0/digit2/usage"} <= set(d)
        assert d["drift/bps_delta"] == 2.0


def _reduce_all(sparse: bool, layout, digits, steps, window=3, accum=1, backend=None):
    """Per-step metric dicts from `StepMetrics` (what the trainer logs) with the window's storage forced dense or
    sparse (and the sparse storage's backend forced: "torch" is what an accelerator gets)."""
    g = torch.Generator().manual_seed(1)
    drift = DriftReference(_profile(layout, g), layout)
    sources = MetricSources(layout=layout, drift=drift, drift_rate="rate/bps_entropy", digits=digits)
    sm = StepMetrics(sources, window, torch.device("cpu"), world=1, grad_accum=accum)
    assert sm.window.drift is drift and sm.window.storage == "dense"  # 2^10 codes: what the window picks
    storage = "sparse" if sparse else "dense"
    sm.window = CodebookWindow(layout, window, digits=digits, drift=drift, storage=storage, backend=backend)
    out = []
    for codes in steps:
        for part in range(accum):  # a step split into micro-batches along the batch
            sl = slice(part * 4 // accum, (part + 1) * 4 // accum)
            mb = {s: (c[sl], None if m is None else m[sl]) for s, (c, m) in codes.items()}
            rate = (torch.tensor(3.0), torch.tensor(0.25))
            sm.add(StepOutput(torch.tensor(1.0), {}, codes=mb, ratios={"rate/bps_entropy": rate}))
        out.append(sm.reduce(None, torch.tensor(0.0), {}))
    return out


def test_trainer_metrics_are_the_same_through_either_window_at_2_10_codes():
    layout = {"sem": (2**10, 2), "pro": (27, 1), "spk": (16, 4)}
    digits = {"sem": [4] * 5, "pro": [3, 3, 3]}
    g = torch.Generator().manual_seed(2)
    steps = [_step(g, layout, B=4, T=40) for _ in range(6)]
    dense, sparse = _reduce_all(False, layout, digits, steps), _reduce_all(True, layout, digits, steps)
    for d, s in zip(dense, sparse, strict=True):
        assert list(d) == list(s)
        bad = {k: (d[k], s[k]) for k in d if abs(d[k] - s[k]) > 1e-6}
        assert not bad, bad
    keys = dense[-1]
    assert {"drift/sem/js", "codebook/sem/l1/dead", "codebook/sem/l0/digit4/perplexity"} <= set(keys)
    assert 0 < keys["drift/sem/js"] < 1
    # Micro-batches merge into the same counts: the sparse metrics are exact integers of the counts, so equal bitwise.
    assert _reduce_all(True, layout, digits, steps, accum=2) == sparse
    # The accelerator path (the window's arrays as device tensors, its summary in the step's host copy) logs the same.
    on_device = _reduce_all(True, layout, digits, steps, backend="torch")
    for h, t in zip(sparse, on_device, strict=True):
        assert list(h) == list(t) and all(abs(h[k] - t[k]) <= 1e-9 for k in h), {k: (h[k], t[k]) for k in h}


def test_the_storage_is_chosen_by_codebook_size():
    assert CodebookWindow({"sem": (DENSE_MAX_CODES, 1)}, 2).storage == "dense"
    assert CodebookWindow({"sem": (DENSE_MAX_CODES + 1, 1), "spk": (16, 2)}, 2).storage == "sparse"
    assert CodebookWindow({"sem": (2**20, 1)}, 2, storage="dense").storage == "dense"
    # The sparse storage's arrays: numpy on a CPU device (the cheaper per operation), device tensors elsewhere.
    assert CodebookWindow({"sem": (2**20, 1)}, 2)._counts.host
    on_meta = CodebookWindow({"sem": (2**20, 1)}, 2, device="meta", digits={"sem": [4] * 10})
    assert not on_meta._counts.host and on_meta._counts.counts.device.type == "meta"
    with pytest.raises(ValueError, match="backend"):
        CodebookWindow({"sem": (2**20, 1)}, 2, backend="cupy")
    with pytest.raises(ValueError, match="storage"):
        CodebookWindow({"sem": (16, 1)}, 2, storage="hashed")


def test_fsq_digit_metrics_follow_the_quantizers_own_codes():
    levels = [5, 4, 3]
    q = ResidualFSQ(dim=6, levels=levels, num_residual=1)
    z = torch.randn(2, 50, 6, generator=torch.Generator().manual_seed(3)) * 3
    codes = q(z).codes  # (B, T, 1)
    K = math.prod(levels)
    assert q.digit_levels == levels and q.codebook_size == K
    # The quantizer's own per-dimension values: indices_to_codes gives each dim's grid value in [-1, 1].
    values = q.fsq.indices_to_codes(codes[..., 0]).reshape(-1, 3)
    for storage in ("dense", "sparse"):
        w = CodebookWindow({"sem": (K, 1)}, 2, digits={"sem": levels}, storage=storage)
        got = w.step({"sem": (codes, None)})
        for j, lv in enumerate(levels):
            vals, counts = torch.unique(values[:, j], return_counts=True)
            p = counts.double() / counts.sum()
            assert got[f"codebook/sem/l0/digit{j}/usage"] == pytest.approx(len(vals) / lv)
            assert got[f"codebook/sem/l0/digit{j}/perplexity"] == pytest.approx(
                float(torch.exp2(-(p * p.log2()).sum()))
            )


def test_digit_levels_must_make_the_codebook():
    with pytest.raises(ValueError, match="do not make its codebook"):
        CodebookWindow({"sem": (81, 1)}, 2, digits={"sem": [3, 3, 3]})


def test_sparse_storage_resumes_exactly_and_ignores_code_order():
    g = torch.Generator().manual_seed(4)
    steps = [_step(g) for _ in range(6)]
    a, b = (CodebookWindow(LAYOUT, 4, digits=DIGITS, storage="sparse") for _ in range(2))
    for codes in steps[:5]:
        got_a = a.step(codes)
        k = b.keys(codes)
        got_b = b.metrics(b.push(k[torch.randperm(k.numel(), generator=g)]))  # the same codes in another order
    assert got_a == got_b
    c = CodebookWindow(LAYOUT, 4, digits=DIGITS, storage="sparse")
    c.load_state(a.state())
    assert a.step(steps[5]) == c.step(steps[5]) and a.pos == c.pos == 6
    with pytest.raises(ValueError, match="dense window"):
        c.load_state(CodebookWindow(LAYOUT, 4).state())
    with pytest.raises(ValueError, match="sparse window"):
        CodebookWindow(LAYOUT, 4).load_state(c.state())


def test_window_memory_is_bounded_at_2_20_codes():
    """8 steps × 800 codes at 2^20 codes per level: the window holds one int32 per code and one int32 scratch mark per code plus the step keys (8 MB),
    not window × codebook floats (the dense window's 72 MB; 400 MB at the default 50 steps)."""
    layout = {"sem": (2**20, 1)}
    w = CodebookWindow(layout, 8)
    g = torch.Generator().manual_seed(5)
    for _ in range(12):
        codes = ((torch.rand(8, 100, 1, generator=g) ** 4) * 2**20).long()
        vec = w.step({"sem": (codes, None)})
    mb = w.nbytes() / 2**20
    assert mb < 12, f"the codebook window holds {mb:.0f} MB"
    assert all(math.isfinite(v) for v in vec.values()) and 0 < vec["codebook/sem/l0/usage"] <= 8 * 800 / 2**20


def test_bounded_memory_fails_without_the_sparse_window(request, monkeypatch):
    mechanisms.assert_fails_without(
        test_window_memory_is_bounded_at_2_20_codes, "sparse_codebook_window", r"the codebook window holds", request,
        monkeypatch,
    )  # fmt: skip


def test_codec_trains_with_a_2_16_code_fsq_level(corpus_dir, teacher_dir, tmp_path):
    """A tiny codec whose semantic FSQ has 4^8 = 65,536 codes per level: per-step codebook and digit metrics exist and
    are finite, the trainer uses the sparse window, and the window's memory is bounded; the checkpoint resumes it."""
    from siren.train.trainer import Trainer
    from tests.helpers import stage_config

    ov = {
        "train.max_steps": 3,
        "train.checkpoint_every": 3,
        "samples.enabled": "false",
        "sem_quantizer.levels": "[4,4,4,4,4,4,4,4]",
    }
    tr = Trainer(stage_config("codec", corpus_dir, teacher_dir, tmp_path / "run", **ov))
    assert tr.step_metrics.sources.layout["sem"][0] == 4**8
    tr.fit()
    # 2 × int32 per code + the ring: under 4 MB (a dense window: 50 steps × 6 rows × 4^8 float64 = 157 MB)
    assert tr.step_metrics.window.storage == "sparse" and tr.step_metrics.window.nbytes() < 4 * 2**20
    rows = [json.loads(x) for x in (Path(tmp_path / "run") / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "codebook/sem/l0/usage" in r]
    assert len(steps) == 3
    for r in steps:
        keys = [k for k in r if k.startswith("codebook/sem/l0/")]
        assert len(keys) == 3 + 2 * 8, keys
        assert all(math.isfinite(r[k]) for k in keys)
        assert 0 < r["codebook/sem/l0/usage"] <= 1 and r["codebook/sem/l0/dead"] < 4**8
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_3" / "trainer" / "codebook_window.pt")
    assert "sparse_keys" in state and state["pos"] == 3


def test_profile_stores_a_large_codebook_sparsely_and_drift_reads_it():
    from siren.metrics.profile import finish_profile

    K = DENSE_MAX_CODES * 2
    g = torch.Generator().manual_seed(6)
    hist = torch.zeros(2, K, dtype=torch.float64)
    hist.index_add_(1, torch.randint(0, K, (300,), generator=g), torch.ones(2, 300, dtype=torch.float64))
    small = torch.ones(1, 16, dtype=torch.float64)
    sums = {"layout": {"sem": (K, 2), "spk": (16, 1)}, "hists": {"sem": hist, "spk": small}, "bits": 1.0}
    prof = finish_profile({**sums, "seconds": 1.0, "n": 1})
    stored = json.loads(json.dumps(prof))["histograms"]
    assert isinstance(stored["spk"], list) and set(stored["sem"]) == {"codes", "counts"}
    assert sum(len(c) for c in stored["sem"]["codes"]) == int((hist > 0).sum())
    layout = {"sem": (K, 2), "spk": (16, 1)}
    prof = {**prof, "histograms": stored}
    ref = DriftReference(prof, layout)
    assert ref.code.size == int((hist > 0).sum()) + 16  # the baseline's support only
    assert np.allclose(ref.entropy, torch.cat([entropy_bits(hist), entropy_bits(small)]).numpy(), rtol=0, atol=1e-12)
    w_s, w_d = CodebookWindow(layout, 3, drift=ref), CodebookWindow(layout, 3, drift=ref, storage="dense")
    assert w_s.storage == "sparse"
    codes = {"sem": (torch.randint(0, K, (2, 30, 2), generator=g), None), "spk": (torch.randint(0, 16, (2, 1)), None)}
    _same(w_s.step(codes), w_d.step(codes))


def test_two_processes_give_the_sparse_metrics_of_one(corpus_dir, teacher_dir, tmp_path, subprocess_env):
    """2 gloo processes × batch 4 log the codebook metrics of 1 process × batch 8 at a 2^16-code level: the sparse
    window merges every rank's codes (gathered), so what rank 0 logs covers the whole global batch. Step 1 runs on the
    same weights in both runs, so its metrics must be equal. The gather's negative control (`sparse_window_gather`)
    runs the same comparison between two in-process ranks (tests/test_codebook_properties.py), not a second launch."""
    import subprocess

    from siren.train.trainer import Trainer
    from tests.helpers import ROOT, launch_cmd, reset_accelerate, stage_config

    ov = {
        "train.max_steps": 1,
        "samples.enabled": "false",
        "sem_quantizer.levels": "[4,4,4,4,4,4,4,4]",
        "tracking.mode": "disabled",  # the metrics are read from metrics.jsonl; W&B would only add its start-up
    }
    reset_accelerate()
    Trainer(stage_config("codec", corpus_dir, teacher_dir, tmp_path / "one", **ov, **{"train.batch_size": 8})).fit()
    reset_accelerate()
    cmd = launch_cmd("codec", corpus_dir, teacher_dir, tmp_path / "two", **ov, **{"train.batch_size": 4})
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    def codebook(run):
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        return {k: v for k, v in row.items() if k.startswith("codebook/sem/")}

    one, two = codebook(tmp_path / "one"), codebook(tmp_path / "two")
    assert one and set(one) == set(two)
    differ = {k: (one[k], two[k]) for k in one if one[k] != pytest.approx(two[k], rel=1e-6, abs=1e-9)}
    assert not differ, f"2-process sparse codebook metrics differ from 1 process: {differ}"


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_drift_over_the_window_or_the_baseline_whichever_is_smaller(backend):
    """The JS cross term runs over the baseline's codes when it used fewer codes than the window holds, else over the
    window's codes: both give the dense window's drift (masked frames and evictions included)."""
    layout = {"sem": (2**10, 2), "spk": (16, 1)}
    g = torch.Generator().manual_seed(7)
    wide = torch.randint(1, 4, (2, 2**10), generator=g).double()  # every code used: support 2,048 > the window
    narrow = torch.zeros(2, 2**10, dtype=torch.float64)
    narrow[:, :12] = 3.0  # 12 codes per level: support < the window's codes
    for hist, over_window in ((wide, True), (narrow, False)):
        profile = {
            "layout": {s: list(v) for s, v in layout.items()},
            "histograms": {"sem": hist.tolist(), "spk": [[1.0] * 16]},
            "bps_entropy": 5.0,
        }
        ref = DriftReference(profile, layout)
        dense = CodebookWindow(layout, 3, drift=ref, storage="dense")
        sparse = CodebookWindow(layout, 3, drift=ref, storage="sparse", backend=backend)
        for _ in range(5):
            codes = {
                "sem": (torch.randint(0, 40, (2, 15, 2), generator=g), torch.rand(2, 15, generator=g) > 0.3),
                "spk": (torch.randint(0, 16, (2, 1), generator=g), None),
            }
            _same(sparse.step(codes, 7.0), dense.step(codes, 7.0))
            assert (ref.code.shape[0] > sparse._counts._ring_n) is over_window


def test_steps_of_many_sizes_keep_the_window_bounded():
    """Variable-length batches give every step another number of codes: the per-shape caches stay bounded and the
    metrics still equal the dense window's."""
    layout = {"sem": (2**13, 1)}
    dense, sparse = CodebookWindow(layout, 4, storage="dense"), CodebookWindow(layout, 4)
    g = torch.Generator().manual_seed(8)
    for t in range(5, 45):  # 40 different step sizes
        codes = {"sem": (torch.randint(0, 2**13, (2, t, 1), generator=g), None)}
        d, s = dense.step(codes), sparse.step(codes)
        assert len(sparse._counts._signs) <= 16
    _same(s, d)


def test_a_one_dimensional_fsq_stream_beside_a_large_codebook_trains():
    """The reported crash: `pro_quantizer.levels=[9]` beside a stream of more than 4,096 codes broke the sparse
    window at step 1 (`operands could not be broadcast`). Through `StepMetrics`, with the storage it picks: every
    step's usage and digit metrics of the 1-D stream are those of its codes in the window (direct count)."""
    layout, digits = {"sem": (2**13, 2), "pro": (9, 1), "spk": (16, 2)}, {"pro": [9]}
    sm = StepMetrics(MetricSources(layout=layout, digits=digits), 3, torch.device("cpu"), world=1, grad_accum=1)
    assert sm.window.storage == "sparse"
    g = torch.Generator().manual_seed(9)
    history = []
    for _ in range(5):  # past the window of 3: evictions
        pro = torch.randint(0, 7, (2, 4, 1), generator=g)  # codes 7, 8 unused: usage < 1
        codes = {
            "sem": (torch.randint(0, 2**13, (2, 6, 2), generator=g), torch.rand(2, 6, generator=g) > 0.3),
            "pro": (pro, None),
            "spk": (torch.randint(0, 16, (2, 2), generator=g), None),
        }
        sm.add(StepOutput(torch.tensor(1.0), {}, codes=codes))
        got = sm.reduce(None, torch.tensor(0.0), {})
        history.append(pro.reshape(-1))
        counts = torch.bincount(torch.cat(history[-3:]), minlength=9).double()
        p = counts[counts > 0] / counts.sum()
        for key in ("codebook/pro/l0/usage", "codebook/pro/l0/digit0/usage"):
            assert got[key] == pytest.approx(int((counts > 0).sum()) / 9)
        for key in ("codebook/pro/l0/perplexity", "codebook/pro/l0/digit0/perplexity"):
            assert got[key] == pytest.approx(float(torch.exp2(-(p * p.log2()).sum())))
