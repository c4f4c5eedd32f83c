"""Evaluation hook: `eval/loss` and `eval/<term>` on the first batches of the val set, split across ranks.

Batch b of the fixed eval list goes to rank `b % world`; each rank sums its batches, the sums are gathered and
combined, so the result does not depend on the number of processes and no rank repeats another's work. Ratios
(`eval/drift/sem/agreement`, `eval/rate/bps_entropy`, ...) are pooled as numerator and denominator sums.
"""

from __future__ import annotations

import torch

from siren.train.context import StageContext


class Evaluator:
    def __init__(self, ctx: StageContext, stage, dataset_factory, batch_size: int, max_batches: int = 4):
        self.ctx, self.stage, self.batch_size, self.max_batches = ctx, stage, batch_size, max_batches
        self._factory = dataset_factory
        self._val = None

    def __call__(self, modules: dict, trainable_root: torch.nn.Module) -> dict[str, float]:
        part = self.partial(modules, trainable_root)
        if part is None:
            return {}
        sums, n = part
        return self.combine(self.ctx.gather(sums), n)

    def batches(self) -> list[int]:
        """The eval batches this rank runs: batch b of the fixed list goes to rank b % world."""
        n = min(self.max_batches, max(1, len(self._val) // self.batch_size))
        return self.ctx.shard(range(n))

    @torch.no_grad()
    def partial(self, modules: dict, trainable_root: torch.nn.Module) -> tuple[dict[str, float], int] | None:
        """This rank's sums over its batches, and the total number of eval batches (None without a val set).

        Runs with every module in eval mode and on a forked RNG, so it never changes the training trajectory."""
        from siren.data.datasets import collate

        if self._val is None:
            self._val = self._factory()
            if self._val is None:
                return None
        val, bs, ctx = self._val, self.batch_size, self.ctx
        n = min(self.max_batches, max(1, len(val) // bs))
        sums: dict[str, float] = {}
        was = [m.training for m in trainable_root.modules()]
        trainable_root.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                for b in self.batches():
                    items = [val[i] for i in range(b * bs, min(len(val), (b + 1) * bs))]
                    batch = {k: (v.to(ctx.device) if k in ("wav", "lengths") else v) for k, v in collate(items).items()}
                    out = self.stage.step(modules, batch)
                    vals = {"eval/loss": out.loss, **{f"eval/{k}": v for k, v in out.terms.items()}}
                    for k, (num, den) in out.ratios.items():
                        vals[f"eval/{k}/num"], vals[f"eval/{k}/den"] = num, den
                    host = torch.stack([v.detach().to(torch.float64) for v in vals.values()]).tolist()
                    for k, v in zip(vals, host, strict=True):
                        sums[k] = sums.get(k, 0.0) + v
        finally:
            for m, t in zip(trainable_root.modules(), was, strict=True):
                m.training = t
        return sums, n

    @staticmethod
    def combine(parts: list[dict[str, float]], n: int) -> dict[str, float]:
        """Every rank's sums → means over the n batches; ratios pooled as Σ numerator / Σ denominator."""
        total: dict[str, float] = {}
        for part in parts:
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
        out: dict[str, float] = {}
        for k in sorted(total):
            if k.endswith("/num"):
                out[k[:-4]] = total[k] / max(total[k[:-4] + "/den"], 1e-12)
            elif not k.endswith("/den"):
                out[k] = total[k] / n
        return out
