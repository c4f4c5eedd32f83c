"""Lineage (docs/sharing.md#lineage): what a checkpoint consumed, the code language it speaks, and the checks that use them.

- The **code language id** of a codec is a sha256 over the quantizers' and the entropy model's tensors — weights *and*
  every buffer, including the non-persistent grid constants (FSQ levels, bases, residual scales) that a state dict
  leaves out. Two codecs with the same id produce and read the same codes for the same latents.
- A **checkpoint record** is what `meta.json` keeps for every consumed checkpoint: the URI as typed, the step directory
  it resolved to when it was loaded (a run dir or `:latest` moves on; the step dir does not), and its fingerprint.
- A `flow` checkpoint records the code language it was trained to read; anything that pairs a flow with a codec
  (samples, verify, `siren decode`, `adapt`) refuses a mismatch, naming both checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from siren.checkpoints.meta import CheckpointMeta
from siren.config.stages import CODE_LANGUAGE_PARTS
from siren.errors import SirenError
from siren.models.io import hash_tensors

log = logging.getLogger("siren")


class CodeLanguageMismatch(SirenError):
    """A decoder-side checkpoint (flow) reads another code language than the codes it would be given."""


class LineageError(SirenError):
    """A consumed checkpoint or feature extractor is not the one the lineage says it must be."""


def _all_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters, persistent buffers and non-persistent buffers (grid constants), by dotted name."""
    out = {k: v.detach() for k, v in module.state_dict().items()}
    for name, buf in module.named_buffers():  # includes persistent=False buffers
        out.setdefault(name, buf.detach())
    return out


def code_language_id(modules: Mapping[str, nn.Module]) -> str:
    """sha256 hex over the quantizers' and entropy model's tensors, grid constants included."""
    missing = [n for n in CODE_LANGUAGE_PARTS if n not in modules]
    if missing:
        raise SirenError(f"a code language needs {', '.join(CODE_LANGUAGE_PARTS)}; missing {', '.join(missing)}")
    h = hashlib.sha256(b"siren-code-language-v1")
    for part in CODE_LANGUAGE_PARTS:
        h.update(part.encode())
        hash_tensors(h, _all_tensors(modules[part]))
    return h.hexdigest()


def checkpoint_fingerprint(meta: CheckpointMeta) -> str:
    """One fingerprint for a whole checkpoint: sha256 over its per-component fingerprints."""
    return hashlib.sha256(json.dumps(meta.fingerprints, sort_keys=True).encode()).hexdigest()


def checkpoint_record(uri: str, path: str | Path, meta: CheckpointMeta) -> dict:
    """What `meta.json` keeps about a consumed checkpoint: URI as typed, resolved step dir, fingerprint, stage."""
    return {
        "uri": str(uri),
        "path": str(Path(path).resolve()),
        "fingerprint": checkpoint_fingerprint(meta),
        "stage": meta.stage,
        "step": meta.step,
        "code_language": meta.code_language,
    }


def ssl_record(cfg, ssl_module: nn.Module | None = None) -> dict:
    """The SSL model a run's features come from: name, layer and the preprocessing applied to the waveform."""
    rec = {
        "name": cfg.ssl.name,
        "layer": int(cfg.ssl.layer),
        "preprocessing": ssl_preprocessing(cfg),
    }
    if ssl_module is not None:
        from siren.models.io import fingerprint

        rec["fingerprint"] = fingerprint(ssl_module)
    return rec


def ssl_preprocessing(cfg) -> dict:
    """The waveform the SSL model sees: sample rate and frame hop; SIREN feeds raw, unnormalised samples."""
    return {"sample_rate": int(cfg.audio.sample_rate), "hop_length": int(cfg.audio.hop_length), "normalize": False}


def check_ssl_matches(consumer_cfg, producer_meta: CheckpointMeta, producer_where: str) -> None:
    """The consumer's SSL layer and preprocessing must equal those the producer (a baseline) was trained with."""
    pcfg = producer_meta.config
    want_layer = (producer_meta.ssl or {}).get("layer", pcfg.get("ssl", {}).get("layer"))
    audio = pcfg.get("audio", {})
    want_pre = (producer_meta.ssl or {}).get("preprocessing") or {
        "sample_rate": audio.get("sample_rate", consumer_cfg.audio.sample_rate),
        "hop_length": audio.get("hop_length", consumer_cfg.audio.hop_length),
        "normalize": False,
    }
    problems = []
    if want_layer is not None and int(want_layer) != int(consumer_cfg.ssl.layer):
        problems.append(f"ssl.layer is {consumer_cfg.ssl.layer} here but {want_layer} in {producer_where}")
    got_pre = ssl_preprocessing(consumer_cfg)
    for key, want in want_pre.items():
        if got_pre.get(key) != want:
            problems.append(f"SSL preprocessing {key} is {got_pre.get(key)!r} here but {want!r} in {producer_where}")
    if problems:
        raise LineageError(
            "the features would not be the ones the baseline was trained on: " + "; ".join(problems) + "; use the "
            "baseline's SSL settings"
        )


def check_flow_reads(
    codec_language: str,
    codec_where: str,
    flow_meta: Mapping,
    flow_where: str,
    quantizer_fingerprints: Mapping[str, str] | None = None,
) -> None:
    """Refuse a flow checkpoint trained on another code language than `codec_language` (naming both checkpoints).

    A flow written before code languages were recorded is checked by its quantizers' weight fingerprints
    (`quantizer_fingerprints`, the codec's); that older check does not see grid constants, which is logged.
    """
    reads = flow_meta.code_language
    if reads is None:
        recorded = flow_meta.fingerprints
        names = [n for n in CODE_LANGUAGE_PARTS[:3] if n in recorded]
        if quantizer_fingerprints is None or not names:
            raise CodeLanguageMismatch(
                f"the flow checkpoint {flow_where} records no code language, so it cannot be checked against "
                f"{codec_where}; retrain the flow stage on this baseline"
            )
        differ = [n for n in names if recorded[n] != quantizer_fingerprints.get(n)]
        if differ:
            raise CodeLanguageMismatch(
                f"the flow checkpoint {flow_where} reads another code language than {codec_where}: "
                f"{', '.join(differ)} differ; use the flow trained on this codec's codes"
            )
        log.warning(
            "%s predates code-language ids: checked by quantizer weights only (grid constants not compared)",
            flow_where,
        )
        return
    if reads != codec_language:
        raise CodeLanguageMismatch(
            f"the flow checkpoint {flow_where} reads code language {reads[:12]} but {codec_where} speaks "
            f"{codec_language[:12]}: its quantizers/entropy model differ, so the flow would render the wrong audio; "
            "use a flow trained on this baseline (baseline: its codec run)"
        )


def verified_code_language(modules: Mapping[str, nn.Module], meta: CheckpointMeta, where: str) -> str:
    """The code language of a loaded codec checkpoint, checked against the one its meta.json recorded.

    A difference means the code that rebuilt the modules sets other grid constants (FSQ levels, residual scales) than
    the code that trained them: the same weights would then produce other codes, silently.
    """
    got = code_language_id(modules)
    want = meta.code_language
    if want is not None and want != got:
        raise LineageError(
            f"{where} records code language {want[:12]} but its components, rebuilt by this version of SIREN, speak "
            f"{got[:12]}: the quantizers' grid constants or weights are not the ones it was trained with"
        )
    return got


def resolve_recorded(record: Mapping, role: str, where: str) -> Path:
    """The step dir a consumed checkpoint record names — the one that was actually used — verified by fingerprint.

    The recorded step dir is used while it exists (a run dir or `:latest` moves on; a step dir does not). When it is
    gone (another machine, pruned), the URI is resolved again and accepted only with the same fingerprint.
    """
    from siren.checkpoints.artifacts import CheckpointNotFound, resolve_checkpoint
    from siren.checkpoints.layout import read_meta

    want = record.get("fingerprint")
    path = record.get("path")
    if path and (Path(path) / "meta.json").is_file():
        got = checkpoint_fingerprint(read_meta(Path(path)))
        if want is None or got == want:
            return Path(path)
        raise LineageError(
            f"{role} step dir {path} recorded in {where} now holds another checkpoint "
            f"(fingerprint {got[:12]} ≠ recorded {want[:12]})"
        )
    uri = record.get("uri")
    if not uri:
        raise LineageError(f"{where} records no usable location for its {role} (recorded: {dict(record)})")
    try:
        resolved = resolve_checkpoint(uri)
    except (CheckpointNotFound, FileNotFoundError) as exc:
        gone = f"the recorded step dir {path} no longer exists and " if path else ""
        raise LineageError(f"{role} of {where}: {gone}{uri} cannot be resolved: {exc}") from exc
    got = checkpoint_fingerprint(read_meta(resolved))
    if want is not None and got != want:
        gone = f"the recorded step dir {path} no longer exists and " if path else ""
        raise LineageError(
            f"{role} of {where}: {gone}{uri} now resolves to {resolved}, another checkpoint "
            f"(fingerprint {got[:12]} ≠ recorded {want[:12]})"
        )
    if path:
        log.info("%s: recorded step dir %s is gone; using %s (same fingerprint)", role, path, resolved)
    return resolved
