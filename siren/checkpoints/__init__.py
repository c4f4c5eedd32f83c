"""Checkpoints: the one place that knows how a run directory and a checkpoint look, and how to read them.

- `layout`: the run directory (`RunDir`) and the step directories inside it, written atomically (`begin_step`,
  `commit_step`), pruned (`apply_retention`) and read (`read_meta`, `load_components`).
- `meta`: `CheckpointMeta`, the schema of a step's `meta.json`.
- `artifacts`: checkpoint URIs (step dir, run dir, `wandb:ENTITY/PROJECT/NAME:ALIAS`), the local artifact index and
  W&B artifacts.
- `load`: `load_checkpoint`, which every reader of a checkpoint goes through.
- `lineage`: what a checkpoint consumed, its fingerprint and the code language it speaks.

The trainer writes through this package; models, metrics, data and coding read through it and never import the
trainer.
"""
