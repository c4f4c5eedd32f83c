"""`siren import`: turn a team's existing checkpoints into a normal SIREN run (DESIGN §18).

    siren import --config MY_CODEC.yaml --stage codec --out runs/acme

builds the stage's components from the config (SIREN's own classes or `target:` classes, each with its foreign
`weights:`), and writes `RUN/checkpoints/step_0/` exactly as a training run would: `components/<name>.safetensors`,
`meta.json` (stage, config, fingerprints, targets, and the source files with their sha256), `latest`, `config.yaml`,
and a local artifact index entry (`wandb:<entity>/<project>/<stage>-<run name>:latest` resolves without a server).
The run is then usable wherever a checkpoint URI is: `baseline=`, `pipeline.flow=`, `pipeline.vocoder=`,
`student_ssl.path=`, `siren verify`, `siren encode`.

Every saved component must come with weights: a component that has parameters but no `weights:` would be saved with
random values, so it is refused (listing all of them at once).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from torch import nn

from siren.config.loader import dump_config, to_dict
from siren.config.schema import SirenConfig
from siren.errors import SirenError

log = logging.getLogger("siren")

CODEC_PARTS = ("factorizer", "sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model", "decoder")
IMPORT_STAGES: dict[str, tuple[str, ...]] = {
    "codec": CODEC_PARTS,
    "flow": ("fuser", "flow"),
    "vocoder": ("vocoder",),
    "distill": ("student_ssl",),
}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _has_state(module: nn.Module) -> bool:
    return len(module.state_dict()) > 0


def import_run(cfg: SirenConfig, stage: str, out: str | Path) -> Path:
    """Build `stage`'s components from `cfg` (targets + weights) and write them as step 0 of the run `out`.
    Returns the step directory."""
    from siren.artifacts import artifact_name, index_checkpoint
    from siren.models.builders import build_component, component_targets
    from siren.models.io import fingerprint
    from siren.train import checkpoint as ckpt
    from siren.train.stages.adapt import baseline_fingerprint
    from siren.train.stages.common import code_layout, load_checkpoint

    if stage not in IMPORT_STAGES:
        raise SirenError(f"siren import: unknown stage {stage!r}; one of {', '.join(IMPORT_STAGES)}")
    out = Path(out)
    if ckpt.list_steps(out):
        raise SirenError(f"{out} already holds checkpoints; import into a new run directory")
    names = list(IMPORT_STAGES[stage])
    if stage == "distill" and cfg.student_ssl.path and not cfg.student_ssl.target:
        raise SirenError(
            "siren import --stage distill: student_ssl.path is set; a saved TinyHubert dir is already usable as "
            "student_ssl.path — import is for foreign students (student_ssl.target + weights)"
        )
    cfg.stage = stage  # the imported run is a run of this stage
    cfg.run_dir = str(out)

    modules: dict[str, nn.Module] = {}
    lineage: dict = {"baseline": {"uri": None, "fingerprint": None}}
    if stage in ("codec", "distill"):
        modules["ssl"] = build_component("ssl", cfg)  # loaded by name; its fingerprint pins the teacher
    if stage == "flow":
        if cfg.baseline:
            # A flow reads one code language: record the codec it was trained on, as a `flow` run does.
            base = load_checkpoint(cfg.baseline, ["factorizer", "sem_quantizer", "pro_quantizer", "spk_quantizer"])
            for n, m in base.modules.items():
                setattr(cfg, n, getattr(base.cfg, n))
                modules[n] = m
            lineage["baseline"] = {"uri": cfg.baseline, "fingerprint": baseline_fingerprint(base.meta)}
        else:
            log.warning(
                "siren import --stage flow without `baseline:`: the flow's code language is not recorded, so "
                "renders cannot check that it reads the codec's codes"
            )
    unweighted = [n for n in names if not getattr(cfg, n).weights]
    ssl_dim = modules["ssl"].dim if "ssl" in modules else None
    for n in names:
        modules[n] = build_component(n, cfg, ssl_dim=ssl_dim if n == "factorizer" else None)
    random = [n for n in unweighted if _has_state(modules[n])]
    if random:
        raise SirenError(
            f"siren import: {', '.join(random)} ha{'s' if len(random) == 1 else 've'} parameters but no `weights:`; "
            "importing would save random values. Give each a weights file"
        )

    sources = {}
    for n in names:
        sec = getattr(cfg, n)
        if sec.weights:
            p = Path(sec.weights).resolve()
            sources[n] = {
                "path": str(p),
                "sha256": sha256_file(p),
                "weights_key": sec.weights_key,
                "rename": dict(sec.rename),
                "allow_missing": list(sec.allow_missing),
                "allow_unexpected": list(sec.allow_unexpected),
            }
    saved = {n: m for n, m in modules.items() if n != "ssl"}
    layout = code_layout(modules) if stage == "codec" else {}
    meta = {
        "step": 0,
        "stage": stage,
        "run_name": cfg.tracking.run_name or out.resolve().name,
        "config": to_dict(cfg),
        "fingerprints": {n: fingerprint(m) for n, m in modules.items()},
        "targets": component_targets(modules, cfg),
        "frozen": [],
        "frozen_fingerprints": {},
        "trainable": [],
        "code_layout": {k: list(v) for k, v in layout.items()},
        **lineage,
        "imported": {"sources": sources},
        "wandb": {"id": None, "project": cfg.tracking.project, "entity": cfg.tracking.entity, "mode": "none"},
        "metrics": {},
        "best": {"step": None, "value": None},
        "version": _version(),
        "world_size": 1,
        "data": {"excluded": [], "load_failures": 0, "load_failed": []},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    tmp = ckpt.begin_step(out, 0)
    ckpt.save_components(tmp, saved)
    final = ckpt.commit_step(out, tmp, 0, meta)
    index_checkpoint(
        final, cfg.tracking.entity, cfg.tracking.project, artifact_name(stage, meta["run_name"]), ["step_0", "latest"]
    )
    log.info("imported %s (%s) into %s", stage, ", ".join(saved), final)
    return final


def _version() -> str:
    from siren import __version__

    return __version__


def import_cli(args) -> int:
    from siren.config import load_config

    cfg = load_config(args.config, args.overrides)
    final = import_run(cfg, args.stage, args.out)
    print(final)
    return 0
