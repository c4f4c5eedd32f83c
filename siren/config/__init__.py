"""Typed config schema and the YAML loader (`extends`, dotted overrides, validation with suggestions)."""

from siren.config.loader import ConfigError, dump_config, load_config, to_dict
from siren.config.schema import SirenConfig
from siren.config.stages import COMPONENTS, STAGES

__all__ = ["COMPONENTS", "STAGES", "ConfigError", "SirenConfig", "dump_config", "load_config", "to_dict"]
