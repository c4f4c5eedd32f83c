"""The entry: `run_verify` (every rank: prepare → judge its share → rank 0 reports) and `verify_cli` (the exit code,
whatever happened: 0 pass, 1 fail, 2 error, also on Ctrl-C, SIGTERM, out-of-memory and a failed peer process).

Under `accelerate launch` the ranks are `siren.ranks.Ranks`: each rank judges utterances `i % world == rank`; rank 0
reduces the code counts and the per-utterance values in utterance order (the report does not depend on the number of
processes), writes the report and logs to W&B, and every process returns its verdict; an error on any process is
exit 2 on all (docs/verify.md, docs/scale.md)."""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from siren.errors import SirenError
from siren.ranks import Ranks
from siren.verify.errors import VerifyError
from siren.verify.judge import check, compute_metrics, judge_share, reduce
from siren.verify.load import Job, build_codecs, prepare
from siren.verify.report import build_report, format_report, log_wandb, new_record_dir, write_report

log = logging.getLogger("siren")
EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
COLLECTIVE_TIMEOUT_S = 1800  # a rank waits at most this long for its peers at one exchange


def _peer_failed(peers: str) -> Exception:
    return VerifyError(f"verify failed on another process ({peers}); no verdict")


def run_verify(
    run: str | Path,
    step: int,
    data: str | None = None,
    thresholds: dict[str, float] | None = None,
    use_wandb: bool = True,
    wav: str | Path | None = None,
) -> dict:
    """Judge `step` of adapt run `run`; under `accelerate launch` every process judges its share of the eval set and
    every process returns the same report (rank 0 writes it)."""
    ranks = Ranks.launched(COLLECTIVE_TIMEOUT_S)
    agree = partial(ranks.agree, failed=_peer_failed)
    job = agree(lambda: prepare(run, step, data, thresholds, wav))
    # Every verify writes into its own record dir, named once by rank 0 (the others take its name).
    record = agree(lambda: new_record_dir(job.out_dir, job.manifest) if ranks.is_main else None, gather=True)[0]
    job = replace(job, out_dir=record, latest_dir=job.out_dir)
    # every rank's share, in rank order
    parts = agree(lambda: judge_share(job, ranks, *build_codecs(job.adapted, job.base)), gather=True)
    return agree(lambda: conclude(job, parts, use_wandb) if ranks.is_main else None, gather=True)[0]


def conclude(job: Job, parts: list[dict], use_wandb: bool) -> dict:
    """Rank 0: reduce every rank's share, compute the metrics and the verdict, write the report, log to W&B."""
    totals = reduce(job, parts)
    metrics = compute_metrics(totals)
    rep = build_report(job, totals, metrics, check(job.thresholds, metrics), parts[0]["pipeline"])
    write_report(rep, job.out_dir, job.latest_dir)
    if use_wandb:
        log_wandb(rep, job.adapted, job.run, job.step)
    return rep


def verify_cli(args) -> int:
    """Exit 0 = pass, 1 = a threshold failed, 2 = anything else went wrong (never a pass or a fail by accident)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    code = guarded_verdict(lambda: _verify_cli(args))
    _leave_process_group(code)
    return code


def _process_group() -> tuple[int, int]:
    """(rank, world) of the launched process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _leave_process_group(code: int) -> None:
    rank, world = _process_group()
    if world > 1:
        print(f"verify: rank {rank}/{world} exits {code}", flush=True)
        try:
            # Every rank reaches this point (an error on any rank was agreed on before): leave together, so no rank
            # tears its group down while a peer still talks to it (gloo aborts the process then, after the verdict).
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        except Exception as exc:  # the verdict stands: a group broken by a failed peer must not make it a crash
            log.warning("verify: leaving the process group failed: %r", exc)


def guarded_verdict(fn) -> int:
    """Run `fn` (returning 0 or 1) so that every other outcome is exit 2: SIREN errors, unexpected exceptions,
    out-of-memory, Ctrl-C and SIGTERM. A verdict is only ever what the thresholds said."""
    import signal
    import traceback

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _term) if _main_thread() else None
    try:
        code = fn()
        if code not in (EXIT_PASS, EXIT_FAIL, EXIT_ERROR):
            print(f"error: verify returned {code!r}, not a verdict", flush=True)
            return EXIT_ERROR
        return code
    except (SirenError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", flush=True)
    except KeyboardInterrupt as exc:
        print(f"error: verify was interrupted ({exc or 'Ctrl-C'}); no verdict", flush=True)
    except BaseException as exc:  # OOM, bugs, anything: an error verdict, with its traceback for the report
        traceback.print_exc()
        print(f"error: verify crashed: {type(exc).__name__}: {exc}; no verdict", flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_ERROR


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def resolve_run_step(uri: str | Path, step: int | None) -> tuple[Path, int]:
    """`--run` as any checkpoint URI (run dir, step dir, `wandb:` artifact) → (run dir, step). With `--step`, a run
    directory is taken as it is; otherwise the step is the one the URI names (a run directory's latest)."""
    from siren.checkpoints.load import open_checkpoint

    named_step = str(uri).startswith("wandb:") or (Path(uri) / "meta.json").is_file()
    if step is not None and not named_step:  # a run directory (load_pair names what is missing in it)
        return Path(uri), step
    ref = open_checkpoint(uri)  # RUN/checkpoints/step_N, read once
    run = ref.path.parent.parent
    if step is not None and step != ref.meta.step:
        raise VerifyError(f"--run {uri} names step {ref.meta.step} ({ref.path}), but --step {step} was given")
    return run, ref.meta.step


def _verify_cli(args) -> int:
    thresholds = {}
    for t in args.threshold:
        if "=" not in t:
            print(f"error: --threshold {t!r} is not NAME=VALUE", flush=True)
            return EXIT_ERROR
        k, v = t.split("=", 1)
        try:
            thresholds[k] = float(v)
        except ValueError:
            print(f"error: --threshold {k}: {v!r} is not a number")
            return EXIT_ERROR
    wav = getattr(args, "wav", None)
    run, step = resolve_run_step(args.run, args.step)
    rep = run_verify(run, step, args.data, thresholds, use_wandb=not args.no_wandb, wav=wav)
    if _process_group()[0] == 0:  # every rank holds the report and returns its verdict; rank 0 prints it
        print(format_report({**rep, "metrics": {k: v for k, v in rep["metrics"].items() if "/l" not in k}}))
        print(f"report: {Path(rep['out_dir']) / 'report.md'} (the page to open: report.html beside it)")
    if not rep["checks"]:  # run_verify refuses an empty threshold set; a report without checks is no pass
        raise VerifyError("the report holds no threshold check")
    return EXIT_PASS if rep["passed"] else EXIT_FAIL
