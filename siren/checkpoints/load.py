"""Loading named components from a checkpoint URI, strictly, with the checkpoint's own saved config.

Every reader of a checkpoint (the trainer's `init_from` and baselines, `siren.Codec`, samples, verify, eval, the
profile, the importer) goes through `load_checkpoint`: resolve the URI, read `meta.json`, rebuild each component from
the recorded config, check the rebuilt classes against the recorded ones, load the weights strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from siren.checkpoints.artifacts import resolve_checkpoint
from siren.checkpoints.layout import available_components, load_components, read_meta
from siren.checkpoints.meta import CheckpointMeta
from siren.config.loader import config_from_dict
from siren.config.schema import SirenConfig
from siren.errors import SirenError
from siren.models.builders import build_component
from siren.models.io import fingerprint
from siren.models.plugins import class_path


@dataclass(frozen=True)
class CheckpointRef:
    """A resolved checkpoint: its step directory and its `meta.json`, read once."""

    path: Path
    meta: CheckpointMeta

    @property
    def components(self) -> list[str]:
        """The components whose weights the step directory holds."""
        return available_components(self.path)


@dataclass
class LoadedCheckpoint:
    path: Path
    meta: CheckpointMeta
    cfg: SirenConfig
    modules: dict[str, nn.Module]

    @property
    def ref(self) -> CheckpointRef:
        return CheckpointRef(self.path, self.meta)


def open_checkpoint(uri: str | Path | CheckpointRef) -> CheckpointRef:
    """Resolve a checkpoint URI (step dir, run dir, `wandb:` artifact) and read its `meta.json`."""
    if isinstance(uri, CheckpointRef):
        return uri
    path = resolve_checkpoint(uri)
    return CheckpointRef(Path(path), read_meta(path))


def load_checkpoint(
    uri: str | Path | CheckpointRef, names: list[str], *, ssl_cfg_from: SirenConfig | None = None
) -> LoadedCheckpoint:
    """Build `names` with the checkpoint's own saved config and load them strictly from `uri` (a URI, or a
    `CheckpointRef` already opened, which is then neither resolved nor read again).

    `ssl` is not stored in checkpoints: it is loaded by name and its fingerprint must equal the one the checkpoint
    recorded (so a baseline is never paired with a different teacher).
    """
    ref = open_checkpoint(uri)
    path, meta = ref.path, ref.meta
    cfg = config_from_dict(meta.config, f"{path}/meta.json")
    if ssl_cfg_from is not None:
        cfg.ssl = ssl_cfg_from.ssl
    # Weights come from this checkpoint: build the student from its recorded architecture, not from its source path.
    cfg.student_ssl.path = None
    stored = set(available_components(path))
    want = [n for n in names if n != "ssl"]
    missing = [n for n in want if n not in stored]
    if missing:
        raise SirenError(
            f"checkpoint {path} (stage {meta.stage}) has no {', '.join(missing)}; it holds {', '.join(sorted(stored))}"
        )
    modules: dict[str, nn.Module] = {}
    if "ssl" in names:
        modules["ssl"] = build_component("ssl", cfg)
        check_ssl_fingerprint(modules["ssl"], meta, cfg.ssl.name, str(path))
    for n in want:  # targets are re-imported from the saved config; the weights come from the checkpoint
        modules[n] = build_component(n, cfg, load_weights=False)
    check_recorded_classes(modules, meta, str(path))
    load_components(path, {n: modules[n] for n in want})
    return LoadedCheckpoint(path=Path(path), meta=meta, cfg=cfg, modules=modules)


def check_recorded_classes(modules: dict[str, nn.Module], meta: dict, where: str) -> None:
    """The classes rebuilt from a checkpoint's config are the ones its meta.json recorded (`targets`)."""
    recorded = meta.targets
    differ = [
        f"{n}: recorded {recorded[n]['class']}, built {class_path(m)}"
        for n, m in modules.items()
        if n in recorded and recorded[n].get("class") != class_path(m)
    ]
    if differ:
        raise SirenError(f"checkpoint {where} was saved from other classes than its config now builds: {differ}")


def check_ssl_fingerprint(ssl: nn.Module, meta: dict, name: str, where: str) -> None:
    want = meta.fingerprints.get("ssl")
    if want is None:
        return
    got = fingerprint(ssl)
    if got != want:
        raise SirenError(
            f"the SSL model at ssl.name={name} (fingerprint {got[:12]}) is not the one {where} was trained with "
            f"(fingerprint {want[:12]})"
        )
