"""SIREN: train an ultra-low-bitrate speech codec in stages and adapt parts of it with guaranteed-frozen components.

`siren.Codec` (the inference API), `siren.Codes`, `siren.load_audio` and `siren.save_audio` are imported on first
use, so `import siren` stays light (no torch until one of them is touched).
"""

__version__ = "0.1.0"

_LAZY = {
    "Codec": ("siren.codec", "Codec"),
    "Codes": ("siren.codec", "Codes"),
    "load_audio": ("siren.data.audio", "load_audio"),
    "save_audio": ("siren.data.audio", "save_audio"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'siren' has no attribute {name!r}")


__all__ = ["Codec", "Codes", "load_audio", "save_audio", "__version__"]
