"""A step's metrics: every micro-batch accumulated, one all-reduce across ranks, one host copy.

Per micro-batch the stage's loss terms (as means over ranks × micro-batches) and ratio sums (numerator, denominator)
are added into one float64 vector, and the codes are turned into the codebook window's keys
(`siren.metrics.codebook.CodebookWindow`); `reduce` appends the step's counters, all-reduces the vector once (sum),
derives the ratios, has the window reduce the step's keys across ranks and push them, and copies everything, the
window's readout (O(rows) numbers) included, to the host in one go. The window then reads its codebook metrics (and,
when the stage handed over a drift reference, the drift metrics) from its readout on the host.
"""

from __future__ import annotations

import torch

from siren.metrics.codebook import CodebookWindow
from siren.train.stages.base import MetricSources, StepOutput


class StepMetrics:
    """Accumulates one optimizer step's micro-batches and reduces them across ranks (sum of per-rank partial sums)."""

    def __init__(self, sources: MetricSources, window: int, device: torch.device, world: int, grad_accum: int):
        self.sources, self.device, self.world, self.grad_accum = sources, device, world, grad_accum
        self.window = (
            CodebookWindow(sources.layout, window, device, digits=sources.digits, drift=sources.drift)
            if sources.layout
            else None
        )
        self._vec: torch.Tensor | None = None
        self._keys: list[torch.Tensor] = []  # the step's code keys for the window, one tensor per micro-batch
        self._scalar_names: list[str] = []
        self._ratio_names: list[str] = []

    def add(self, out: StepOutput) -> None:
        """One micro-batch: loss terms count 1 / (world × grad_accum) each, ratio sums and codes in full."""
        scalars = {"train/loss": out.loss, **{f"train/{k}": v for k, v in out.terms.items()}}
        parts = [torch.stack([v.detach().to(torch.float64) for v in scalars.values()]) / (self.world * self.grad_accum)]
        if out.ratios:
            parts.append(
                torch.stack([torch.stack([n.to(torch.float64), d.to(torch.float64)]) for n, d in out.ratios.values()])
                .detach()
                .reshape(-1)
            )
        if self.window is not None:
            self._keys.append(self.window.keys(out.codes))
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
        window, drift = self.window, self.sources.drift
        if drift is not None and (ratios is None or self.sources.drift_rate not in self._ratio_names):
            raise RuntimeError(f"the stage's drift rate {self.sources.drift_rate!r} is not among its ratios")
        names += [*counters, "train/grad_norm"]
        outs += [vec[n_s + 2 * n_r :], grad_norm.detach().to(torch.float64).reshape(1).to(self.device)]
        n_dev = len(names)
        if window is not None:  # the step's codes of every rank into the window; its readout rides in the host copy
            outs.append(window.push(self._gather_keys(accelerator)))
        host = torch.cat(outs).cpu().numpy()  # the one host sync of the step
        values = host[:n_dev].tolist()
        self._vec = None
        if window is not None:  # between the ratios and the counters
            rate = values[n_s + self._ratio_names.index(self.sources.drift_rate)] if drift is not None else 0.0
            book = window.metrics(host[n_dev:], rate)
            at = n_s + n_r
            names[at:at], values[at:at] = list(book), list(book.values())
        return dict(zip(names, values, strict=True))

    def _gather_keys(self, accelerator) -> torch.Tensor:
        """The step's code keys of every micro-batch, reduced across ranks by the window (`CodebookWindow.reduce`):
        what it pushes covers every rank's codes."""
        if not self._keys:
            raise RuntimeError("StepMetrics: no codes were added for the codebook window this step")
        keys = torch.cat(self._keys)
        self._keys = []
        return self.window.reduce(keys, accelerator if self.world > 1 else None)
