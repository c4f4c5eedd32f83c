"""The one registry of SIREN's components and stages: each stage declares here, once, its name and its components.

The config schema (`stage:` values, component sections), the trainer's stage classes, `siren import`, the CLI's stage
choices, the demo and the samples' pipeline derive from this table; nothing else lists stage or component names.

A stage's components are those it builds; `trainable` is what it trains unless `trainable:` says otherwise (and what
`siren import --stage` writes for an importable stage); `required_frozen` must stay frozen whatever the config says;
`not_saved` is built but never saved (the SSL teacher is loaded by name and recorded by fingerprint instead);
`pipeline_roles` are the `pipeline.*` checkpoints its audio samples render through.
"""

from __future__ import annotations

from dataclasses import dataclass

# Every component, by registry name: a config section, a builder and a checkpoint file each.
COMPONENTS = (
    "ssl",
    "student_ssl",
    "factorizer",
    "sem_quantizer",
    "pro_quantizer",
    "spk_quantizer",
    "entropy_model",
    "decoder",
    "fuser",
    "flow",
    "vocoder",
)
# The codec's analysis path: features → factorizer → semantic, prosody and speaker quantizers.
ANALYSIS_PARTS = ("factorizer", "sem_quantizer", "pro_quantizer", "spk_quantizer")
# A whole codec checkpoint: the analysis path, the entropy model (the bitstream's probabilities) and the decoder head.
CODEC_PARTS = (*ANALYSIS_PARTS, "entropy_model", "decoder")
# What fixes the code language: two codecs with the same tensors here write and read the same codes.
CODE_LANGUAGE_PARTS = ("sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model")
# The decoder-side checkpoints a codec renders through (`pipeline.flow`, `pipeline.vocoder`) and what each holds.
PIPELINE_PARTS: dict[str, tuple[str, ...]] = {"flow": ("fuser", "flow"), "vocoder": ("vocoder",)}


# The config keys through which one stage reads another's checkpoint, and the stage whose run writes it.
CHECKPOINT_INPUTS: dict[str, str] = {
    "baseline": "codec",
    "student_ssl.path": "distill",
    "pipeline.flow": "flow",
    "pipeline.vocoder": "vocoder",
}


@dataclass(frozen=True)
class StageSpec:
    name: str
    components: tuple[str, ...]
    trainable: tuple[str, ...]
    required_frozen: tuple[str, ...] = ()
    not_saved: tuple[str, ...] = ("ssl",)
    pipeline_roles: tuple[str, ...] = ("vocoder",)
    importable: bool = True  # `siren import --stage NAME` brings a foreign checkpoint of this stage in
    reads: tuple[str, ...] = ()  # config keys naming other stages' checkpoints it builds from (CHECKPOINT_INPUTS)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every config key through which it reads another stage's checkpoint: what it builds from, then the
        `pipeline.*` checkpoints its samples render through."""
        return (*self.reads, *(f"pipeline.{role}" for role in self.pipeline_roles))

    @property
    def needs(self) -> tuple[str, ...]:
        """The stages whose checkpoints it reads (CHECKPOINT_INPUTS), in the order of `inputs`."""
        return tuple(dict.fromkeys(CHECKPOINT_INPUTS[key] for key in self.inputs))

    @property
    def saved(self) -> tuple[str, ...]:
        """The components its checkpoints hold."""
        return tuple(c for c in self.components if c not in self.not_saved)


STAGE_SPECS: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("codec", ("ssl", *CODEC_PARTS), CODEC_PARTS, required_frozen=("ssl",)),
        StageSpec(
            "flow",
            ("ssl", *ANALYSIS_PARTS, *PIPELINE_PARTS["flow"]),
            PIPELINE_PARTS["flow"],
            required_frozen=("ssl", *ANALYSIS_PARTS),
            reads=("baseline",),
        ),
        StageSpec("vocoder", PIPELINE_PARTS["vocoder"], PIPELINE_PARTS["vocoder"], not_saved=(), pipeline_roles=()),
        StageSpec("distill", ("ssl", "student_ssl"), ("student_ssl",), required_frozen=("ssl",), pipeline_roles=()),
        StageSpec(
            "adapt",
            # teacher_factorizer: the baseline's factorizer, frozen, giving the targets the student's codes must match
            ("ssl", "student_ssl", "teacher_factorizer", *CODEC_PARTS),
            ("factorizer",),
            required_frozen=("ssl", "student_ssl", "teacher_factorizer", *CODEC_PARTS[1:]),
            pipeline_roles=("flow", "vocoder"),
            importable=False,
            reads=("baseline", "student_ssl.path"),
        ),
    )
}
STAGES = tuple(STAGE_SPECS)
IMPORTABLE_STAGES = tuple(n for n, s in STAGE_SPECS.items() if s.importable)


def stage_waves(stages: tuple[str, ...] = STAGES) -> tuple[tuple[str, ...], ...]:
    """`stages` in waves: each stage after every stage it needs (`StageSpec.needs`, among `stages`); the stages of a
    wave need nothing from one another, so they can train side by side. Within a wave, registry order."""
    left, done, waves = list(stages), set(), []
    while left:
        wave = tuple(s for s in left if all(n in done or n not in stages for n in STAGE_SPECS[s].needs))
        if not wave:
            raise ValueError(f"stages {left} need one another in a circle")
        waves.append(wave)
        done.update(wave)
        left = [s for s in left if s not in done]
    return tuple(waves)
