"""A step's metrics: every micro-batch accumulated, one all-reduce across ranks, one host copy (DESIGN §7, §17).

Per micro-batch the stage's loss terms (as means over ranks × micro-batches), ratio sums (numerator, denominator) and
code histograms are added into one float64 vector (for large codebooks, `siren.metrics.large_codebook`, the codes are
kept instead and gathered across ranks); `reduce` appends the step's counters, all-reduces the vector once
(sum), then derives ratios, the codebook window's usage/perplexity/dead and — when the stage handed over a drift
reference — the drift metrics, and copies everything to the host in one go. A large codebook's window adds its
O(rows) summary to that copy (on a CPU: the step's codes, pushed into its host arrays after the copy) and its metrics
are finished on the host from those few numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from siren.metrics.codebook import stream_histograms
from siren.metrics.large_codebook import make_window
from siren.train.stages.base import MetricSources, StepOutput


class StepMetrics:
    """Accumulates one optimizer step's micro-batches and reduces them across ranks (sum of per-rank partial sums)."""

    def __init__(self, sources: MetricSources, window: int, device: torch.device, world: int, grad_accum: int):
        self.sources, self.device, self.world, self.grad_accum = sources, device, world, grad_accum
        # Dense window for small codebooks; above `DENSE_MAX_CODES` codes per level the sparse one (the drift
        # reference, when there is one, made the same choice for the same layout).
        sparse = sources.drift.sparse if sources.drift is not None else None
        self.window = (
            make_window(sources.layout, window, device, digits=sources.digits, sparse=sparse)
            if sources.layout
            else None
        )
        self._vec: torch.Tensor | None = None
        self._keys: list[torch.Tensor] = []  # sparse window: the step's code keys, one tensor per micro-batch
        self._scalar_names: list[str] = []
        self._ratio_names: list[str] = []

    def add(self, out: StepOutput) -> None:
        """One micro-batch: loss terms count 1 / (world × grad_accum) each, ratio sums and histograms in full."""
        scalars = {"train/loss": out.loss, **{f"train/{k}": v for k, v in out.terms.items()}}
        parts = [torch.stack([v.detach().to(torch.float64) for v in scalars.values()]) / (self.world * self.grad_accum)]
        if out.ratios:
            parts.append(
                torch.stack([torch.stack([n.to(torch.float64), d.to(torch.float64)]) for n, d in out.ratios.values()])
                .detach()
                .reshape(-1)
            )
        if self.window is not None and self.window.sparse:
            self._keys.append(self.window.keys(out.codes))
        elif self.window is not None:
            parts.append(stream_histograms(self.sources.layout, out.codes))
        vec = torch.cat([p.to(self.device) for p in parts])
        if self._vec is None:
            self._vec, self._scalar_names, self._ratio_names = vec, list(scalars), list(out.ratios)
        else:
            if list(scalars) != self._scalar_names or list(out.ratios) != self._ratio_names:
                raise RuntimeError("a stage reported different loss terms or ratios in two micro-batches of one step")
            self._vec = self._vec + vec

    def reduce(self, accelerator, grad_norm: torch.Tensor, counters: dict[str, float]) -> dict[str, float]:
        """All-reduce the step's sums and `counters` (summed over ranks) once; returns host floats by metric name."""
        if self._vec is None:
            raise RuntimeError("StepMetrics.reduce before any micro-batch was added")
        counts = torch.tensor(list(counters.values()), dtype=torch.float64, device=self.device)
        vec = torch.cat([self._vec, counts])
        if self.world > 1:
            vec = accelerator.reduce(vec, reduction="sum")
        n_s, n_r = len(self._scalar_names), len(self._ratio_names)
        names = self._scalar_names + self._ratio_names
        outs = [vec[:n_s]]
        ratios = None
        if n_r:
            pairs = vec[n_s : n_s + 2 * n_r].view(n_r, 2)
            ratios = pairs[:, 0] / pairs[:, 1].clamp_min(1e-12)
            outs.append(ratios)
        i = n_s + 2 * n_r
        window, drift = self.window, self.sources.drift
        if drift is not None and (ratios is None or self.sources.drift_rate not in self._ratio_names):
            raise RuntimeError(f"the stage's drift rate {self.sources.drift_rate!r} is not among its ratios")
        if window is not None and not window.sparse:
            k = window.padded.flat_idx.numel()
            window.push_flat(vec[i : i + k])
            i += k
            names += window.names()
            outs.append(window.vector())
            if drift is not None:
                names += drift.names()
                outs.append(
                    drift.vector(window.running, ratios[self._ratio_names.index(self.sources.drift_rate)], window.stats)
                )
        names += [*counters, "train/grad_norm"]
        outs += [vec[i:], grad_norm.detach().to(torch.float64).reshape(1).to(self.device)]
        n_dev = len(names)
        if window is not None and window.sparse:  # its O(rows) summary (or, on the host backend, the step's codes)
            keys = self._gather_keys(accelerator)
            if window.host:
                outs.append(keys.to(torch.float64))  # pushed after the copy (`_sparse_metrics`)
            else:
                window.push(keys)
                outs.append(window.summary(drift))
        host = torch.cat(outs).cpu().numpy()  # the one host sync of the step
        values = host[:n_dev].tolist()
        self._vec = None
        if window is not None and window.sparse:  # between the ratios and the counters, as in the dense path
            at = n_s + n_r
            names[at:at], values[at:at] = self._sparse_metrics(host[n_dev:], values[n_s:at])
        return dict(zip(names, values, strict=True))

    def _sparse_metrics(self, tail, ratios: list[float]) -> tuple[list[str], list[float]]:
        """The sparse window's codebook (and drift) metrics from what followed the step's values in its host copy: the
        window's summary, or on the host backend the step's codes, pushed here first."""
        window, drift = self.window, self.sources.drift
        if window.host:
            window.push(tail.astype(np.int64))
            tail = window.summary(drift)
        rate = ratios[self._ratio_names.index(self.sources.drift_rate)] if drift is not None else 0.0
        book, drifted = window.finish(tail, drift, rate)
        if drift is None:
            return window.names(), book
        return window.names() + drift.names(), book + drifted

    def _gather_keys(self, accelerator) -> torch.Tensor:
        """The step's code keys of every micro-batch and rank (the sparse window's counts are merged by gathering
        codes, not by summing histograms; the metrics depend only on the counts, not on the order)."""
        if not self._keys:
            raise RuntimeError("StepMetrics: no codes were added for the sparse codebook window this step")
        keys = torch.cat(self._keys)
        self._keys = []
        if self.world > 1:
            keys = accelerator.gather(accelerator.pad_across_processes(keys, dim=0, pad_index=self.window.trash))
        return keys
