"""`siren demo` (`make demo`): the whole pipeline on the embedded corpus, on a CPU, then verify and eval.

Order: vocoder and distill side by side (they depend on nothing; the vocoder first, so every later checkpoint's samples
are audible) → codec → flow → adapt → verify beside eval (`siren eval` of the adapted codec and its baseline against
Codec 2 700C and 450 on human speech Debian ships, `siren.data.human`; its table is printed last). Each stage runs as
`python -m siren train --config configs/demo/<stage>.yaml` in a subprocess (its log in `RUN/train.log`) while this
process copies its output there and draws a progress bar from the trainer's status lines. A stage whose latest
checkpoint is already at `train.max_steps` is skipped; an interrupted one resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from siren.checkpoints.layout import RunDir
from siren.config.stages import CHECKPOINT_INPUTS, PIPELINE_PARTS, STAGE_SPECS, stage_waves

# Stages in waves, from the registry: each after the stages whose checkpoints it reads. The stages of one wave run side
# by side, each with its share of the CPU threads: two small trainers on 2 cores, one thread each, finish about 1.3×
# sooner than one after the other with two threads each (measured: vocoder + distill, 300 steps each).
WAVES = stage_waves()
STAGES = tuple(s for wave in WAVES for s in wave)


def stage_overrides(stage: str, root: str, data: str) -> list[str]:
    """Point a demo config at `--root` (runs) and `--data` (corpus + teacher), so both flags mean what they say: every
    checkpoint a stage reads (`StageSpec.reads`, and the pipeline for its samples) is the run of the stage that writes
    it under `--root`."""
    return [
        f"run_dir={root}/{stage}",
        f"data.train={data}/train.jsonl",
        f"data.val={data}/val.jsonl",
        f"ssl.name={data}/tiny_hubert",
        f"data.feature_cache={data}/cache",  # the teacher's SSL features, computed once for codec, flow and distill
        *(f"pipeline.{role}={root}/{CHECKPOINT_INPUTS[f'pipeline.{role}']}" for role in PIPELINE_PARTS),
        *(f"{key}={root}/{CHECKPOINT_INPUTS[key]}" for key in STAGE_SPECS[stage].reads),
    ]


class _Stage:
    """One stage's subprocess: its output copied to `RUN/train.log` and drawn as a bar from its status lines."""

    def __init__(self, stage: str, env: dict, root: str, data: str, position: int):
        from siren.checkpoints.layout import latest_step
        from siren.config import load_config

        self.stage, self.t0, self.t_end = stage, time.perf_counter(), None
        self.cfg_path = Path("configs/demo") / f"{stage}.yaml"
        self.overrides = stage_overrides(stage, root, data)
        cfg = load_config(self.cfg_path, self.overrides)
        self.run_dir, self.total = Path(cfg.run_dir), cfg.train.max_steps
        self.done = (latest_step(self.run_dir) or 0) >= self.total if self.run_dir.exists() else False
        self.proc = self.thread = None
        if self.done:
            print(f"{stage:<8} already finished ({self.total} steps) — skipped")
            return
        import threading

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "siren", "train", "--config", str(self.cfg_path), *self.overrides,
             "train.status_every=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
        )  # fmt: skip
        self.thread = threading.Thread(target=self._copy, args=(position,), daemon=True)
        self.thread.start()

    def _copy(self, position: int) -> None:
        """Copy the stage's output to its log and draw its bar (the trainer's status lines are the one source)."""
        from tqdm import tqdm

        from siren.train.progress import parse_status

        with (
            open(RunDir(self.run_dir).train_log, "a") as logf,
            tqdm(total=self.total, desc=f"{self.stage:<8}", unit="step", position=position, dynamic_ncols=True) as bar,
        ):
            for line in self.proc.stdout:
                logf.write(line)
                status = parse_status(line)
                if status is not None:
                    bar.n = status[0]
                    bar.set_postfix(loss=f"{status[2]:.3f}", refresh=True)

    def wait(self) -> int:
        if self.proc is None:
            return 0
        code = self.proc.wait()
        self.thread.join()
        self.t_end = self.t_end or time.perf_counter()  # its own end, not its wave's
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the trainer checkpoints where it is (exit 75); a rerun resumes it

    def result(self) -> dict:
        from siren.train.tracking import read_metrics

        rows = read_metrics(RunDir(self.run_dir).metrics)
        last = rows[-1] if rows else {}
        return {
            "stage": self.stage,
            "run_dir": str(self.run_dir),
            "steps": last.get("step", 0),
            "loss": last.get("train/loss"),
            "wall_s": (self.t_end or time.perf_counter()) - self.t0,
            "skipped": self.done,
            "last": last,
        }


def busy_cores(seconds: float = 0.5) -> float:
    """How many CPU cores other processes keep busy right now (from /proc/stat over `seconds`; 0 where unreadable)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        (b0, t0), _ = sample(), time.sleep(seconds)
        b1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (os.cpu_count() or 1) * (b1 - b0) / max(1, t1 - t0)


def wave_threads(wave_len: int, env: dict) -> int | None:
    """Intra-op threads per stage of a wave: the free cores split between its stages. None = PyTorch's default.

    A trainer with more threads than free cores does not slow down in proportion but collapses: its threads wait for
    one another at every operation while one of them is off its core (measured here: a codec step 50 ms → 1.4 s with
    one other busy process on 2 cores). So the demo counts the cores other processes keep busy when a wave starts and
    gives each stage its share of the rest; `OMP_NUM_THREADS` set by the user is the budget instead."""
    if env.get("OMP_NUM_THREADS"):
        return max(1, int(env["OMP_NUM_THREADS"]) // wave_len)
    cores = os.cpu_count() or 1
    free = max(1, round(cores - busy_cores()))
    if wave_len == 1 and free >= cores:
        return None
    return max(1, free // wave_len)


def run_wave(wave: tuple[str, ...], env: dict, root: str, data: str) -> list[dict]:
    """Run the stages of one wave side by side, the CPU threads split between them; a failure stops the others."""
    env = dict(env)
    threads = wave_threads(len(wave), env)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"== {' + '.join(wave)}: {threads or 'all'} CPU thread(s) each", flush=True)
    stages = [_Stage(stage, env, root, data, position=i) for i, stage in enumerate(wave)]
    codes: dict[str, int] = {}
    try:
        while len(codes) < len(stages) and not any(codes.values()):
            for st in stages:
                if st.stage not in codes and (st.proc is None or st.proc.poll() is not None):
                    codes[st.stage] = st.wait()
            time.sleep(0.2)
    finally:
        if len(codes) < len(stages):  # one failed (or this process was interrupted): stop the others where they are
            for st in stages:
                st.stop()
                codes.setdefault(st.stage, st.wait())
    failed = next((name for name, code in codes.items() if code != 0), None)  # in the order they ended: the cause
    for st in stages:
        if st.stage == failed:
            log = RunDir(st.run_dir).train_log
            tail = log.read_text().splitlines()[-25:]
            raise RuntimeError(
                f"stage {st.stage} failed (exit {codes[st.stage]}); last lines of {log}:\n" + "\n".join(tail)
            )
    return [st.result() for st in stages]


# The eval at the end: SIREN systems (stage run dirs under --root) against Codec 2 on human clips. Every metric is
# scored; what sets its time is the clip count. Measured on 2 cores: 6 clips (11.5 s of audio) × 5 rows took 63 CPU s,
# of which pocketsphinx (WER, a fresh decoder per utterance) ~30 s, DNSMOS ~15 s (each clip tiled to its 9 s window),
# PESQ + STOI + speaker embedding ~2 s, coding ~1 s, start-up the rest; all 15 clips took ~3.7 min. 5 clips (3
# codec2-examples, 2 alsa-utils, 10 s of audio) are about a minute of CPU (89 s wall in a demo on a machine loaded 5-8).
EVAL_CLIPS = 5
EVAL_SIREN = ("adapt", "codec")  # the adapted codec and its baseline
EVAL_CODEC2 = ("700C", "450")


def eval_command(root: str, clips_dir: str | Path, out: str | Path, wandb: bool = True) -> list[str]:
    """`python -m siren eval` of the demo's SIREN runs and Codec 2 on `clips_dir`, its W&B tables beside the adapt
    run (`wandb=False`: none)."""
    cmd = [sys.executable, "-m", "siren", "eval", "--data", str(clips_dir), "--out", str(out)]
    for name in EVAL_SIREN:
        cmd += ["--system", f"{name}={root}/{name}"]
    for mode in EVAL_CODEC2:
        cmd += ["--system", f"codec2_{mode}=codec2:{mode}"]
    return cmd + (["--wandb-run", f"{root}/adapt"] if wandb else [])


def run_eval(root: str, data: str, env: dict, max_clips: int = EVAL_CLIPS, wandb: bool = True) -> dict:
    """Prepare the human clips under `data/human` and run `siren eval` into `root/eval` → {"out", "wall_s", "table",
    "clips"}; a failed eval is a RuntimeError with the end of its output."""
    from siren.data.human import ALSA_ROOT, prepare_human_clips

    t0 = time.perf_counter()
    clips = prepare_human_clips(Path(data) / "human", max_clips=max_clips)
    alsa = "" if "alsa-utils" in clips["packages"] else f" (no alsa-utils samples in {ALSA_ROOT})"
    print(
        f"== eval: {len(clips['clips'])} human clips, {clips['seconds']:.1f} s, from "
        f"{' + '.join(clips['packages'])}{alsa}: {', '.join(EVAL_SIREN)} vs Codec 2 {', '.join(EVAL_CODEC2)}",
        flush=True,
    )
    out = Path(root) / "eval"
    res = subprocess.run(eval_command(root, clips["dir"], out, wandb), env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"siren eval failed (exit {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return {
        "out": out,
        "wall_s": time.perf_counter() - t0,
        "table": (out / "eval.md").read_text(),
        "clips": clips,
    }


def verify_command(run: Path, step: int) -> list[str]:
    return [sys.executable, "-m", "siren", "verify", "--run", str(run), "--step", str(step)]


def verify_beside_eval(adapt_run: Path, step: int, root: str, data: str, env: dict) -> tuple[Path, dict]:
    """Verify step `step` of the adapt run against its baseline in a subprocess while `run_eval` runs: both only read
    the finished runs and write apart (RUN/verify/, ROOT/eval), so they run side by side, the free cores split
    between them. → (the verify report's path, `run_eval`'s result). A failed or interrupted eval stops the verify;
    a verify that errs (exit 2, or no report) is a RuntimeError with the end of its output."""
    side = dict(env)
    threads = wave_threads(2, env)
    if threads is not None:
        side["OMP_NUM_THREADS"] = str(threads)
    print(f"== verify {adapt_run} step {step} (beside the eval)", flush=True)
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: nobody reads it until the eval is done
        verifying = subprocess.Popen(
            verify_command(adapt_run, step), env=side, stdout=log, stderr=subprocess.STDOUT, text=True
        )
        try:
            evaluated = run_eval(root, data, side)
        except BaseException:  # the eval failed or was interrupted: stop the verify too
            verifying.terminate()
            raise
        finally:
            verifying.wait()
        log.seek(0)
        out = log.read()
    report_path = RunDir(adapt_run).verify(step) / "report.json"
    if verifying.returncode == 2 or not report_path.is_file():
        raise RuntimeError(f"verify failed with an error (exit {verifying.returncode}):\n{out[-6000:]}")
    return report_path, evaluated


def run_demo(root: str = "runs/demo", data: str = "data/demo", n: int = 800) -> int:
    from siren.checkpoints.layout import latest_step
    from siren.data.corpus import build_corpus
    from siren.models.ssl import save_tiny_teacher

    if not Path("configs/demo/codec.yaml").is_file():
        raise FileNotFoundError("run `siren demo` from the SIREN repository root (configs/demo/ not found)")
    t_start = time.perf_counter()
    env = dict(os.environ)
    env.setdefault("WANDB_SILENT", "true")
    print(f"== corpus: {data} ({n} utterances, Debian TTS voices)")
    summary = build_corpus(data, n=n, seed=0)
    print(
        f"   {summary.get('num_train', '?')} train / {summary.get('num_val', '?')} val utterances, "
        f"speakers: {', '.join(summary.get('speakers', []))}"
    )
    teacher = Path(data) / "tiny_hubert"
    if not (teacher / "config.json").is_file():
        save_tiny_teacher(teacher, seed=0)
        print(f"== teacher: tiny random HuBERT saved to {teacher} (stand-in for facebook/hubert-base-ls960)")
    results = []
    for wave in WAVES:
        results.extend(run_wave(wave, env, root, data))

    adapt_run = Path(root) / "adapt"
    step = latest_step(adapt_run)
    report_path, evaluated = verify_beside_eval(adapt_run, step, root, data, env)
    report = json.loads(report_path.read_text())

    print("\n== summary")
    print(f"{'stage':<9}{'steps':>7}{'final loss':>12}{'wall s':>9}")
    for r in results:
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], float) else "-"
        print(
            f"{r['stage']:<9}{r['steps']:>7}{loss:>12}{r['wall_s']:>9.1f}{'  (skipped: done)' if r['skipped'] else ''}"
        )
    print(f"{'eval':<9}{'':>7}{'':>12}{evaluated['wall_s']:>9.1f}")
    last = results[-1]["last"]
    print(
        f"adapt: agreement sem {last.get('drift/sem/agreement', float('nan')):.3f} / pro "
        f"{last.get('drift/pro/agreement', float('nan')):.3f} / spk {last.get('drift/spk/agreement', float('nan')):.3f}"
        f", entropy drift sem {last.get('drift/sem/entropy_delta_bits', float('nan')):+.3f} bits, "
        f"bit/s {last.get('rate/bps_entropy', float('nan')):.1f} (nominal {last.get('rate/bps_nominal', 0):.1f}), "
        f"frozen/ok {last.get('frozen/ok')}"
    )
    m = report["metrics"]
    print(
        f"verify step {step}: {'PASS' if report['passed'] else 'FAIL'} — agreement sem {m['agreement/sem']:.3f}, "
        f"bitstream {m['bps_real/adapted']:.1f} bit/s (baseline {m['bps_real/baseline']:.1f}), mel L1 vs truth "
        f"{m['mel_l1/adapted_vs_truth']:.3f} (baseline {m['mel_l1/baseline_vs_truth']:.3f}, silence "
        f"{m['mel_l1/silence_vs_truth']:.3f}, noise {m['mel_l1/noise_vs_truth']:.3f})"
    )
    print(f"   report: {report_path.with_suffix('.html')} (open in a browser; also {report_path.with_suffix('.md')})")
    print("\n== where things are")
    for r in results:
        rd = RunDir(r["run_dir"])
        s = latest_step(rd.root)
        if s is not None and any(rd.samples(s).glob("*.wav")):
            print(f"   samples {r['stage']:<8} {rd.samples(s)}")
    offline = sorted(Path(root).glob("*/wandb/offline-run-*"))
    if offline:
        print(f"   W&B offline runs: {len(offline)} under {root}/*/wandb/ — upload with:")
        print(f"     wandb sync {root}/*/wandb/offline-run-*")
    out = evaluated["out"]
    print(f"\n== eval on human speech ({out / 'eval.md'}, {out / 'report.html'})")
    print("   the demo codec learned from synthetic TTS voices only: this is what it measures on human recordings")
    print(evaluated["table"], end="")
    total = time.perf_counter() - t_start
    print(f"total wall time {total:.0f} s (eval {evaluated['wall_s']:.0f} s of it)")
    return 0
