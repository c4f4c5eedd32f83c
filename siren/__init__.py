"""SIREN: train an ultra-low-bitrate speech codec in stages and adapt parts of it with guaranteed-frozen components."""

__version__ = "0.1.0"
