"""Typed configuration schema for SIREN.

Every key a config file may hold is a field here. The loader (`siren.config.loader`) validates a merged YAML tree against
these dataclasses and reports unknown keys (with the nearest valid key) and wrong types (key, value, expected type).
Component sections (`ssl`, `factorizer`, ...) sit at the top level so that keys such as `ssl.name` and
`student_ssl.path` read the same in YAML, on the command line and in W&B sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from siren.config.migrations import SCHEMA_VERSION
from siren.config.stages import STAGES

StageName = Literal[STAGES]  # the stages of the registry (siren.config.stages)


def at_least(default: Any, low: float, *, strictly: bool = False) -> Any:
    """A numeric field whose values the loader checks against a lower bound: `>= low`, or `> low` when `strictly`
    (a count of 0, a negative rate or size is a mistake to name at load, not an error deep inside a run). `None`, where
    the field allows it, is not checked."""
    return field(default=default, metadata={"low": low, "strictly": strictly})


# ----------------------------------------------------------------------------------------------------------------- audio
@dataclass
class AudioConfig:
    """Signal front end shared by every component: 16 kHz mono, 80-bin log-mel at 50 frames/s (hop 320)."""

    sample_rate: int = at_least(16000, 1)
    n_mels: int = at_least(80, 1)
    hop_length: int = at_least(320, 1)
    n_fft: int = at_least(1024, 1)
    win_length: int = at_least(1024, 1)
    f_min: float = at_least(0.0, 0)
    f_max: float = at_least(8000.0, 0, strictly=True)


# ------------------------------------------------------------------------------------------------------------ components
@dataclass
class ComponentSource:
    """Where a component comes from (docs/bring-your-own-codec.md). Without `target`: SIREN's own class, built from the section's keys.

    `target: "pkg.mod:Name"` builds a foreign class with `args` (constructor keyword arguments, checked against its
    signature); `adapter: "pkg.mod:Name"` wraps it to its role (`Adapter(module, **adapter_args)`). `weights` loads a
    foreign checkpoint (.pt/.pth with weights_only=True, or .safetensors) into the (unwrapped) module: `weights_key`
    picks a nested dict (dotted path, e.g. `state_dict` or `model.ema`), `rename` maps regex → replacement (applied in
    order), `allow_missing` / `allow_unexpected` name tolerated mismatches (fnmatch patterns). Weights are read when a
    component is built from a config (`siren import`, or a stage building it fresh), never when it is rebuilt from a
    SIREN checkpoint, which holds its own weights.
    """

    target: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None
    adapter_args: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    weights_key: str | None = None
    rename: dict[str, str] = field(default_factory=dict)
    allow_missing: list[str] = field(default_factory=list)
    allow_unexpected: list[str] = field(default_factory=list)


@dataclass
class SSLConfig(ComponentSource):
    """Frozen teacher: a `transformers.HubertModel` loaded with `from_pretrained(name)`; hidden states of `layer`."""

    name: str = ""
    layer: int = 9


@dataclass
class StudentSSLConfig(ComponentSource):
    """TinyHubert: a small `HubertConfig` + linear head to the teacher's dim. `path` loads a saved one."""

    path: str | None = None
    hidden_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    conv_dim: int = 128
    teacher_dim: int = 768


@dataclass
class FactorizerConfig(ComponentSource):
    input_dim: int = 768
    hidden_dim: int = 256
    num_blocks: int = 4
    num_heads: int = 4
    kernel_size: int = 15
    sem_dim: int = 256
    pro_dim: int = 128
    spk_dim: int = 256
    dropout: float = 0.1


@dataclass
class FSQConfig(ComponentSource):
    """ResidualFSQ: in-projection (dim → len(levels)), `num_residual` FSQ levels on the residual, out-projection."""

    levels: list[int] = field(default_factory=lambda: [3, 3, 3, 3])
    num_residual: int = 1


@dataclass
class PQConfig(ComponentSource):
    """Product quantizer for the speaker embedding: `groups` codebooks of `codebook_size` codes."""

    groups: int = 8
    codebook_size: int = 256


@dataclass
class EntropyModelConfig(ComponentSource):
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    max_len: int = 4096
    dropout: float = 0.0


@dataclass
class DecoderConfig(ComponentSource):
    hidden_dim: int = 256
    num_blocks: int = 4
    kernel_size: int = 7


@dataclass
class FuserConfig(ComponentSource):
    hidden_dim: int = 256
    cond_dim: int = 256
    num_blocks: int = 4
    kernel_size: int = 7


@dataclass
class FlowConfig(ComponentSource):
    hidden_dim: int = 256
    num_blocks: int = 6
    kernel_size: int = 7
    steps: int = 8
    solver: Literal["euler", "midpoint"] = "euler"
    sigma_min: float = 1e-4


@dataclass
class VocoderConfig(ComponentSource):
    dim: int = 512
    intermediate_dim: int = 1536
    num_blocks: int = 8
    n_fft: int = 1280


# ------------------------------------------------------------------------------------------------------------- training
@dataclass
class DataConfig:
    train: str = ""
    val: str = ""
    segment_seconds: float = at_least(2.0, 0, strictly=True)
    min_seconds: float = at_least(0.5, 0)
    # A file at another sample rate or with more than one channel: `resample_down` (higher rates resampled to
    # audio.sample_rate and mixed to mono, lower rates skipped and counted), `skip` (anything else skipped and counted,
    # like a corrupt file) or `convert` (every rate resampled, narrowband upsampled too).
    on_format_mismatch: Literal["resample_down", "skip", "convert"] = "resample_down"
    num_workers: int = at_least(0, 0)
    # Root of the cache subsystem (`siren cache`): SSL features when set; adapt's teacher cache (default RUN/cache).
    feature_cache: str | None = None
    cache_batch_seconds: float = at_least(0.0, 0)  # padded seconds per forward when filling; 0 = one utterance (exact)
    cache_verify: bool = True  # check every shard's CRC-32 at start (each rank a share)
    profile_utts: int = at_least(256, 1)  # speaker-balanced reference subset of the baseline profile (adapt)


@dataclass
class TrainConfig:
    max_steps: int = at_least(1000, 0)
    batch_size: int = at_least(8, 1)  # utterances per micro-batch in EACH process (see global_batch_size)
    grad_accum: int = at_least(1, 1)
    # Utterances per optimizer step over all processes and micro-batches. Set, it decides the per-process batch
    # (global ÷ (processes × grad_accum), which must divide evenly) and results do not depend on the process count;
    # null: train.batch_size per process, so the global batch grows with the number of processes.
    global_batch_size: int | None = at_least(None, 1)
    log_every: int = at_least(1, 1)
    checkpoint_every: int = at_least(500, 1)
    keep_last: int = at_least(3, 0)
    keep_steps: list[int] = field(default_factory=list)
    best_metric: str = "train/loss"
    best_mode: Literal["min", "max"] = "min"
    seed: int = 0
    # None: the launcher's setting applies (accelerate config / ACCELERATE_MIXED_PRECISION); set: it wins.
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    max_grad_norm: float = 1.0
    max_bad_steps: int = at_least(5, 0)
    codebook_window: int = at_least(50, 1)
    min_free_mb: int = at_least(200, 0)
    status_every: int = at_least(50, 1)  # off a terminal: one status line every N steps (rank 0)
    # frozen/ok: cheap on-device checksum of every frozen tensor every N steps (0: only the sha256 at checkpoints)
    frozen_check_every: int = at_least(1, 0)
    hang_timeout_s: float | None = at_least(
        1800.0, 0, strictly=True
    )  # a step or hook unfinished after this long dumps stacks and exits; null: off


@dataclass
class GroupConfig:
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class OptimConfig:
    lr: float = at_least(3e-4, 0)
    weight_decay: float = at_least(0.0, 0)
    betas: list[float] = field(default_factory=lambda: [0.8, 0.99])
    scheduler: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = at_least(0, 0)
    groups: dict[str, GroupConfig] = field(default_factory=dict)
    # AdamW's implementation: `fused` (one kernel over all tensors, CPU and CUDA; ~4× faster than the per-tensor loop
    # on CPU), `foreach`, or `auto` (PyTorch's own choice: the per-tensor loop on CPU, foreach on CUDA).
    impl: Literal["fused", "foreach", "auto"] = "fused"


@dataclass
class LossConfig:
    """Loss weights; each stage reads the ones it uses."""

    mel: float = 1.0
    commit: float = 0.25
    entropy: float = 1.0
    latent: float = 1.0
    agreement: float = 0.5
    fm: float = 1.0
    stft: float = 1.0
    distill_l1: float = 1.0
    distill_cos: float = 1.0
    # adapt: teacher targets from the cached whole-utterance teacher path cut to the crop (`full`), or from the teacher
    # path run on the crop itself at every step (`crop`: what the student sees, no cache, one teacher forward per step).
    # crop: the teacher path runs on the student's crop each step (better held-out agreement on the demo, one teacher
    # forward per step); full: whole-utterance targets from the teacher cache, cut to the crop (cheaper per step).
    teacher_targets: Literal["full", "crop"] = "crop"


@dataclass
class TrackingConfig:
    project: str = "siren"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    run_name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    upload_trainer_state: bool = False  # checkpoint artifacts carry optimizer/trainer state only when true


@dataclass
class PipelineConfig:
    """Checkpoints for the inference path used by samples and verify (the seed's "golden standard" bundle)."""

    flow: str | None = None
    vocoder: str | None = None


@dataclass
class SamplesConfig:
    enabled: bool = True
    num: int = at_least(2, 0)
    max_seconds: float = at_least(4.0, 0, strictly=True)
    utterances: list[str] = field(default_factory=list)


@dataclass
class VerifyConfig:
    data: str | None = None
    max_utts: int = at_least(64, 1)  # speaker-balanced subset of the eval manifest
    thresholds: dict[str, float] = field(default_factory=dict)
    real_clip: str | None = "/usr/share/codec2/raw/speech_orig_16k.wav"


# ----------------------------------------------------------------------------------------------------------------- root
@dataclass
class SirenConfig:
    # Written into every dumped config and meta.json; older saved configs load through `siren.config.migrations`.
    schema_version: int = SCHEMA_VERSION
    stage: StageName = "codec"
    run_dir: str = "runs/default"
    preset: str = ""
    baseline: str | None = None
    freeze: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    audio: AudioConfig = field(default_factory=AudioConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    student_ssl: StudentSSLConfig = field(default_factory=StudentSSLConfig)
    factorizer: FactorizerConfig = field(default_factory=FactorizerConfig)
    sem_quantizer: FSQConfig = field(default_factory=FSQConfig)
    pro_quantizer: FSQConfig = field(default_factory=FSQConfig)
    spk_quantizer: PQConfig = field(default_factory=PQConfig)
    entropy_model: EntropyModelConfig = field(default_factory=EntropyModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    fuser: FuserConfig = field(default_factory=FuserConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    vocoder: VocoderConfig = field(default_factory=VocoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
