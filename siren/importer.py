"""`siren import`: turn a team's existing checkpoints into a normal SIREN run (docs/bring-your-own-codec.md).

    siren import --config MY_CODEC.yaml --stage codec --out runs/acme

builds the stage's components from the config (SIREN's own classes or `target:` classes, each with its foreign
`weights:`), and writes `RUN/checkpoints/step_0/` exactly as a training run would: `components/<name>.safetensors`,
`meta.json` (stage, config, fingerprints, targets, and the source files with their sha256), `latest`, `config.yaml`,
and a local artifact index entry (`wandb:<entity>/<project>/<stage>-<run name>:latest` resolves without a server; the
run name is `tracking.run_name`, else the output dir's name, with a hash of its path when another run dir owns that
name; the index lives under `$SIREN_ARTIFACT_CACHE`, see siren/artifacts.py).
The run is then usable wherever a checkpoint URI is: `baseline=`, `pipeline.flow=`, `pipeline.vocoder=`,
`student_ssl.path=`, `siren verify`, `siren encode`.

Every saved component must come with weights: a component that has parameters but no `weights:` would be saved with
random values, and one with only persistent buffers would be saved with whatever its constructor computed, so both are
refused (listing all of them at once, each in its own words).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from torch import nn

from siren.config.loader import dump_config, to_dict
from siren.config.schema import SirenConfig
from siren.config.stages import ANALYSIS_PARTS, IMPORTABLE_STAGES, STAGE_SPECS
from siren.errors import SirenError

log = logging.getLogger("siren")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _refuse_unweighted(unweighted: list[str], modules: dict[str, nn.Module]) -> None:
    """One error for every component without `weights:` that would be saved with values no file gave: learned
    parameters (random), or persistent buffers alone (whatever the constructor computed), each told in its words."""
    problems = []
    for n in unweighted:
        m = modules[n]
        params = {k for k, _ in m.named_parameters()}
        buffers = [k for k in m.state_dict() if k not in params]
        if params:
            problems.append(f"{n} has parameters but no `weights:`; importing would save random values")
        elif buffers:
            shown = ", ".join(buffers[:6]) + (" ..." if len(buffers) > 6 else "")
            problems.append(
                f"{n} has no parameters, only persistent buffers ({shown}), and no `weights:`; importing would save "
                "the values its constructor computed, not the ones it was used with. Give it a weights file, or, if "
                "the buffers are derived from `args:` and never learned, register them with persistent=False so "
                "they are not state"
            )
    if problems:
        raise SirenError("siren import: " + "\n".join(problems))


def import_run(cfg: SirenConfig, stage: str, out: str | Path) -> Path:
    """Build `stage`'s components from `cfg` (targets + weights) and write them as step 0 of the run `out`.
    Returns the step directory."""
    from siren.checkpoints import layout as ckpt
    from siren.checkpoints.artifacts import artifact_name, claim_artifact_name, derive_run_name, index_checkpoint
    from siren.checkpoints.lineage import checkpoint_fingerprint
    from siren.checkpoints.load import load_checkpoint
    from siren.checkpoints.meta import CheckpointMeta
    from siren.models.analysis import code_layout
    from siren.models.builders import build_component, component_targets
    from siren.models.io import fingerprint

    if stage not in IMPORTABLE_STAGES:
        raise SirenError(f"siren import: unknown stage {stage!r}; one of {', '.join(IMPORTABLE_STAGES)}")
    out = Path(out)
    if ckpt.list_steps(out):
        raise SirenError(f"{out} already holds checkpoints; import into a new run directory")
    names = list(STAGE_SPECS[stage].trainable)  # what a SIREN run of the stage trains
    if stage == "distill" and cfg.student_ssl.path and not cfg.student_ssl.target:
        raise SirenError(
            "siren import --stage distill: student_ssl.path is set; a saved TinyHubert dir is already usable as "
            "student_ssl.path — import is for foreign students (student_ssl.target + weights)"
        )
    cfg.stage = stage  # the imported run is a run of this stage
    cfg.run_dir = str(out)
    # The artifact name is claimed before anything is written: a name another run directory owns is refused here
    # (explicit tracking.run_name) or never chosen (the derived one), so two imports never share `latest`.
    tc = cfg.tracking
    run_name = tc.run_name or derive_run_name(tc.entity, tc.project, stage, out)
    claim_artifact_name(tc.entity, tc.project, artifact_name(stage, run_name), out)

    modules: dict[str, nn.Module] = {}
    lineage: dict = {"baseline": {"uri": None, "fingerprint": None}}
    if stage in ("codec", "distill"):
        modules["ssl"] = build_component("ssl", cfg)  # loaded by name; its fingerprint pins the teacher
    if stage == "flow":
        if cfg.baseline:
            # A flow reads one code language: record the codec it was trained on, as a `flow` run does.
            base = load_checkpoint(cfg.baseline, list(ANALYSIS_PARTS))
            for n, m in base.modules.items():
                setattr(cfg, n, getattr(base.cfg, n))
                modules[n] = m
            lineage["baseline"] = {"uri": cfg.baseline, "fingerprint": checkpoint_fingerprint(base.meta)}
        else:
            log.warning(
                "siren import --stage flow without `baseline:`: the flow's code language is not recorded, so "
                "renders cannot check that it reads the codec's codes"
            )
    unweighted = [n for n in names if not getattr(cfg, n).weights]
    ssl_dim = modules["ssl"].dim if "ssl" in modules else None
    for n in names:
        modules[n] = build_component(n, cfg, ssl_dim=ssl_dim if n == "factorizer" else None)
    _refuse_unweighted(unweighted, modules)

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
    meta = CheckpointMeta(
        step=0,
        stage=stage,
        run_name=run_name,
        config=to_dict(cfg),
        fingerprints={n: fingerprint(m) for n, m in modules.items()},
        targets=component_targets(modules, cfg),
        code_layout={k: list(v) for k, v in layout.items()},
        baseline=lineage["baseline"],
        imported={"sources": sources},
        wandb={"id": None, "project": cfg.tracking.project, "entity": cfg.tracking.entity, "mode": "none"},
        version=_version(),
    )
    out.mkdir(parents=True, exist_ok=True)
    ckpt.RunDir(out).config.write_text(dump_config(cfg))
    tmp = ckpt.begin_step(out, 0)
    ckpt.save_components(tmp, saved)
    final = ckpt.commit_step(out, tmp, 0, meta)
    index_checkpoint(final, tc.entity, tc.project, artifact_name(stage, run_name), ["step_0", "latest"])
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
