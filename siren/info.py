"""`siren info`: parameter count and output rate per component, and the preset's nominal bit/s."""

from __future__ import annotations

from pathlib import Path

from siren.config.schema import COMPONENTS, SirenConfig


def component_info(cfg: SirenConfig) -> dict:
    """Builds every component except `ssl` (counted from its config when it is a local dir or not at all)."""
    from siren.models.builders import build_component, component_rates, nominal_bps

    rates = component_rates(cfg)
    components = {}
    for name in COMPONENTS:
        if name == "ssl" and not Path(cfg.ssl.name or "-").is_dir():
            # A hub id is only fetched at training time; `info` never goes to the network.
            note = f"not counted: {cfg.ssl.name!r} is not a local dir" if cfg.ssl.name else "ssl.name not set"
            components[name] = {"params": None, "rate": rates.get(name, ""), "note": note}
            continue
        if name == "student_ssl" and cfg.student_ssl.path:
            cfg = _without_student_path(cfg)
        try:
            module = build_component(name, cfg)
        except (OSError, ValueError) as exc:  # e.g. hub id that cannot be reached: report, do not invent numbers
            components[name] = {"params": None, "rate": rates.get(name, ""), "note": f"not built: {exc}"}
            continue
        components[name] = {"params": sum(p.numel() for p in module.parameters()), "rate": rates.get(name, "")}
    bps = nominal_bps(cfg)
    return {"preset": cfg.preset, "components": components, "bps": bps, "bps_nominal": bps["total"]}


def _without_student_path(cfg: SirenConfig) -> SirenConfig:
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.student_ssl.path = None  # count the architecture the config describes
    return cfg
