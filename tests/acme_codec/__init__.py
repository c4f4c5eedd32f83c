"""A foreign codec for the bring-your-own-codec tests: written deliberately unlike SIREN (other module structure and
parameter names, channel-first tensors, a waveform decoder, log10-power mels, a rate-only byte-level entropy model,
checkpoints saved with `torch.save` as nested dicts with `module.` prefixes). `siren_adapters` maps it to SIREN's roles."""
