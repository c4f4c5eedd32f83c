"""SIREN command line. Heavy libraries (torch, transformers, wandb) are imported inside the commands so `--help` is fast."""

from __future__ import annotations

import argparse
import json
import os
import sys

from siren.config.stages import IMPORTABLE_STAGES


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (may use `extends:`)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=40")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="siren", description="SIREN: train and adapt an ultra-low-bitrate (~200 bit/s) speech codec."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one stage (codec, flow, vocoder, distill, adapt)")
    _add_config(p)
    p.add_argument("--run-dir", help="run directory (default: the config's run_dir)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in the run dir (they are kept)")
    p.add_argument("--init-from", help="checkpoint URI to load weights from (weights only)")
    p.add_argument(
        "--init-components", help="comma-separated components to take from --init-from (default: all present)"
    )

    p = sub.add_parser("import", help="turn existing (foreign) checkpoints into a SIREN run: step_0 + meta + index")
    _add_config(p)
    p.add_argument("--stage", required=True, choices=IMPORTABLE_STAGES)
    p.add_argument("--out", required=True, help="new run directory, e.g. runs/NAME")

    p = sub.add_parser("info", help="parameter count and output rate per component, nominal bit/s")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("corpus", help="build the embedded multi-speaker corpus with the Debian TTS voices")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=200, help="number of utterances")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)

    p = sub.add_parser("manifest", help="write train/val JSONL manifests from directories of audio")
    p.add_argument("sources", nargs="+", metavar="SRC", help="corpus root directories")
    p.add_argument("--out", required=True, help="output directory (train.jsonl, val.jsonl, rejected.jsonl)")
    p.add_argument("--layout", choices=["auto", "librispeech", "libritts", "vctk", "flat"], default="auto")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val", type=float, default=None, help="fraction of utterances for val, by speaker (0.02)")
    split.add_argument("--val-speakers", type=int, default=None, help="number of speakers held out for val")
    p.add_argument("--jobs", type=int, default=8, help="parallel header reads")

    p = sub.add_parser("init-ssl", help="save a randomly initialised HuBERT teacher (tiny, or hubert-base's shapes)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--like",
        default="tiny",
        help="geometry: tiny (the demo's stand-in) or hubert-base (768-d, 12 layers, HuBERT-base's conv front end)",
    )

    p = sub.add_parser("cache", help="fill the feature or teacher cache for train and val (each process its share)")
    _add_config(p)
    p.add_argument("--what", choices=["features", "teacher"], help="default: teacher for adapt, else features")

    p = sub.add_parser("profile", help="code statistics of a checkpoint on a reference set (baseline profile)")
    p.add_argument("--checkpoint", required=True, help="checkpoint URI")
    p.add_argument("--data", required=True, help="manifest")
    p.add_argument("--out", required=True, help="output JSON")
    p.add_argument("--max-utts", type=int, default=64)

    p = sub.add_parser("verify", help="check an adapted checkpoint against its baseline; exit 0 pass, 1 fail, 2 error")
    p.add_argument(
        "--run",
        required=True,
        help="the adapt run: a run directory, a step directory or a wandb:ENTITY/PROJECT/NAME:ALIAS",
    )
    p.add_argument("--step", type=int, help="the step to judge (default: the one --run names, a run's latest)")
    p.add_argument("--data", help="manifest (default: verify.data or data.val of the run)")
    p.add_argument("--wav", help="judge this one audio file instead of an eval set (not with --data)")
    p.add_argument("--threshold", action="append", default=[], help="override a threshold: NAME=VALUE")
    p.add_argument("--no-wandb", action="store_true")

    p = sub.add_parser("encode", help="wav → .siren bitstream (IN OUT, or IN... --out DIR with files/directories)")
    p.add_argument("inputs", nargs="+", metavar="IN", help="IN.wav OUT.siren, or audio files/directories with --out")
    p.add_argument("--out", help="output directory: one .siren per input file (keeps sub-directories)")
    p.add_argument("--checkpoint", required=True)

    p = sub.add_parser("decode", help=".siren bitstream → wav (IN OUT, or IN... --out DIR with files/directories)")
    p.add_argument("inputs", nargs="+", metavar="IN", help="IN.siren OUT.wav, or .siren files/directories with --out")
    p.add_argument("--out", help="output directory: one .wav per input file (keeps sub-directories)")
    p.add_argument("--checkpoint", help="checkpoint URI (default: the one recorded in the file)")
    p.add_argument("--pipeline-flow", help="checkpoint with fuser + flow (default: the checkpoint's pipeline.flow)")
    p.add_argument("--pipeline-vocoder", help="checkpoint with the vocoder (default: pipeline.vocoder)")

    p = sub.add_parser("eval", help="score codecs from their real bitstreams (SIREN checkpoints, Codec 2, wav dirs)")
    p.add_argument("--data", required=True, help="JSONL manifest or a directory of audio files")
    p.add_argument(
        "--system",
        action="append",
        required=True,
        metavar="NAME=SPEC",
        help="SPEC: a checkpoint URI, codec2:MODE (3200 2400 1600 1400 1300 1200 700C 450) or wav:DIR; repeatable",
    )
    p.add_argument("--out", required=True, help="output directory (eval.json, eval.md, bitstreams/, audio/)")
    p.add_argument("--max-utts", type=int, default=None, help="the first N utterances only")
    p.add_argument("--pipeline-flow", help="fuser + flow checkpoint for SIREN systems (default: their pipeline.flow)")
    p.add_argument("--pipeline-vocoder", help="vocoder checkpoint for SIREN systems (default: pipeline.vocoder)")
    p.add_argument(
        "--wandb-run",
        metavar="RUN",
        help="also log the tables to W&B, beside RUN: a SIREN run directory or a W&B run id [[ENTITY/]PROJECT/]ID",
    )

    p = sub.add_parser("sweep", help="run a W&B sweep (online) or the same sweep offline with the sweeps engine")
    p.add_argument("file")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--offline", action="store_true", help="force the offline engine")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start over: move an earlier run of this sweep aside (offline; without it, its trials are resumed)",
    )

    p = sub.add_parser("demo", help="build the corpus and run every stage on CPU, then verify and eval against Codec 2")
    p.add_argument("--root", default="runs/demo")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--n", type=int, default=800)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = globals()[f"cmd_{args.command.replace('-', '_')}"]
    from siren.errors import USER_ERRORS

    try:
        return int(handler(args) or 0)
    except USER_ERRORS as exc:  # the user's to fix: one line, no traceback; anything else keeps its traceback
        if launched_rank() == 0:  # under a launcher every process meets the same error: say it once
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def launched_rank() -> int:
    """This process's rank when a launcher (accelerate launch, torchrun, srun) started it, else 0."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return 0


# ----------------------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from siren.train.trainer import train_from_cli

    return train_from_cli(
        args.config,
        args.overrides,
        run_dir=args.run_dir,
        fresh=args.fresh,
        init_from=args.init_from,
        init_components=args.init_components,
    )


def cmd_import(args) -> int:
    import logging

    from siren.importer import import_cli

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return import_cli(args)


def cmd_info(args) -> int:
    from siren.config import load_config
    from siren.info import component_info

    info = component_info(load_config(args.config, args.overrides))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"preset: {info['preset'] or '(none)'}")
    print(f"{'component':<16}{'params':>12}  output")
    for name, row in info["components"].items():
        params = f"{row['params']:>12,}" if row["params"] is not None else f"{'-':>12}"
        print(f"{name:<16}{params}  {row['rate']}" + (f"  ({row['note']})" if row.get("note") else ""))
    rows = info["components"]
    foreign = {n: r["class"] for n, r in rows.items() if r["class"] and not r["class"].startswith("siren.")}
    if foreign:  # say what was built: the preset's keys for these components were not read
        print("foreign classes (the preset's keys for these components are not used):")
        print("\n".join(f"  {name}: {cls}" for name, cls in foreign.items()))
    b = info["bps"]
    if b is None:
        print("nominal bit/s: unknown (the factorizer or a stream quantizer was not built)")
        return 0
    streams = ", ".join(
        f"{s} {v['rate_hz']:g} Hz × {v['levels']} × {v['codebook_size']} codes"
        for s, v in info["layout"].items()
        if s != "spk"
    )
    spk = f"; speaker {b['spk_bits_per_utterance']:.0f} bit per utterance" if "spk_bits_per_utterance" in b else ""
    print(f"nominal bit/s: {info['bps_nominal']:.1f} ({streams}){spk}")
    return 0


def cmd_corpus(args) -> int:
    from siren.data.corpus import build_corpus

    summary = build_corpus(args.out, n=args.n, seed=args.seed, jobs=args.jobs)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_manifest(args) -> int:
    from siren.data.scan import build_manifest

    val = 0.02 if args.val is None and args.val_speakers is None else args.val
    summary = build_manifest(
        args.sources, args.out, layout=args.layout, val=val, val_speakers=args.val_speakers, jobs=args.jobs
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_init_ssl(args) -> int:
    from siren.models.ssl import save_random_teacher

    print(save_random_teacher(args.out, like=args.like, seed=args.seed))
    return 0


def cmd_cache(args) -> int:
    from siren.train.cache_command import run_cache

    return run_cache(args)


def cmd_profile(args) -> int:
    from siren.metrics.profile import profile_checkpoint

    prof = profile_checkpoint(args.checkpoint, args.data, max_utts=args.max_utts, out=args.out)
    print(f"wrote {args.out}: {prof['num_utts']} utterances, bps_entropy {prof['bps_entropy']:.1f}")
    return 0


def cmd_verify(args) -> int:
    from siren.verify import verify_cli

    return verify_cli(args)


def cmd_encode(args) -> int:
    from siren.transcode import encode_cli

    return encode_cli(args)


def cmd_decode(args) -> int:
    from siren.transcode import decode_cli

    return decode_cli(args)


def cmd_eval(args) -> int:
    from siren.evaluation import eval_cli

    return eval_cli(args)


def cmd_sweep(args) -> int:
    from siren.sweep import run_sweep

    # prints the ranked table
    trials = run_sweep(args.file, args.count, online=False if args.offline else None, fresh=args.fresh)
    return 0 if trials and all(t.get("returncode", 0) == 0 for t in trials) else 1


def cmd_demo(args) -> int:
    from siren.demo import run_demo

    return run_demo(root=args.root, data=args.data, n=args.n)
