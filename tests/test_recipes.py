"""Recipes are tests: every command block of the README and docs/ that carries a recipe marker runs here, as written,
from a scratch directory (never the repository root), with only the placeholders its marker declares filled in.

The marker is an HTML comment on the line(s) right before a fenced block (other comments may sit between the two):

    <!-- recipe: NAME[; save: PATH][; same-as: FILE][; placeholders: `TOKEN` what it is, `TOKEN` what it is] -->

- `NAME`: the recipe. Blocks of one name run in document order in one directory (a `yaml` block with `save: PATH` is
  written there as PATH, the way the docs tell the user to save it; `bash` blocks run with `bash -euo pipefail`,
  `python` blocks with this interpreter).
- `same-as: FILE`: this block is a copy (in the README, say) of a block of the same recipe in FILE; it must be
  identical to one and is not run twice.
- `placeholders`: the exact strings (in backticks) a user replaces, each followed by a few words on what it is. The
  page must say so visibly: every token also appears in the prose of the block's section. The tests fill exactly
  these (FILLS below must name the same tokens) and nothing else; a token may be filled with itself where the scratch
  directory already holds what it names. A block may hold no other placeholder-like text (`/path/to/...`,
  `<...>`, an all-capitals word).

Every recipe named in the docs has an entry in FILLS and a runner, so a new recipe cannot be added untested
(`test_every_recipe_in_the_docs_is_run`).

Cost: the `own-data` recipe runs once (module fixture: manifest of a folder of audio built from the session corpus,
the tiny preset, 2 steps per stage, then verify), and every other recipe reuses its runs through its placeholders,
two at a time. W&B is disabled in these processes (the offline path is tested elsewhere; a sweep's trials run offline
as the sweep runner makes them) and the quality scorers of verify and eval are stubbed (tests/mechanisms.py
`verify_quality_stub`, `eval_quality_stub`; the real scorers are tested in tests/test_quality.py and test_eval.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import soundfile as sf
import yaml
from helpers import tracking_dirs

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A 2-step codec's codebooks have collapsed: verify's baseline floor (configs/verify/default.yaml) fails it, honestly.
BASELINE_FLOOR = {"min/code_entropy/sem/baseline", "min/code_entropy/pro/baseline"}
LAUNCHER = "accelerate launch --config_file /path/to/siren/launch/accelerate/multi_gpu.yaml -m siren"

# What the tests put where the docs have a placeholder: {recipe: {token: value}}; values are formatted with
# {root} (the checkout), {teacher} (the session's tiny teacher), {audio} (the folder of audio), {project} (the
# own-data project directory) and {tests}.
FILLS: dict[str, dict[str, str]] = {
    "own-data": {
        "/data/my_corpus": "{audio}",
        "/path/to/siren": "{root}",
        "ultra200bps": "tiny",
        "facebook/hubert-base-ls960": "{teacher}",
        "layer: 9": "layer: 3",
        "20000": "2",
        "128": "4",
        LAUNCHER: "siren",
        "runs/mine/codec": "runs/mine/codec",
        "runs/mine/flow": "runs/mine/flow",
        "runs/mine/vocoder": "runs/mine/vocoder",
    },
    "share": {"wandb:local/siren-mine/codec-codec:latest": "wandb:local/siren-mine/codec-codec:latest"},
    "sweep": {"--count 3": "--count 1"},
    "eval": {"--max-utts 20": "--max-utts 2"},
    "byoc": {"/path/to/your/package": "{tests}", "my_codec.yaml": "my_codec.yaml"},
    "encode-decode": {
        "in.wav": "in.wav",
        "more.wav": "more.wav",
        "recordings/": "recordings/",
        "runs/demo/adapt": "{project}/runs/mine/adapt",
    },
    "python-api": {"runs/demo/adapt": "{project}/runs/mine/adapt", "speech.wav": "speech.wav"},
}


# ------------------------------------------------------------------------------------------------------ the markers
@dataclass
class Block:
    page: Path
    line: int
    name: str
    lang: str
    text: str
    save: str | None = None
    same_as: str | None = None
    placeholders: dict[str, str] = field(default_factory=dict)
    prose: str = ""  # the section's text outside code blocks and comments

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


MARKER = re.compile(r"<!-- recipe: (.*?) -->\n((?:<!--.*?-->\n)*)```(\w+)\n(.*?)^```$", re.S | re.M)


def _prose(text: str, pos: int) -> str:
    """The text of the section (between headings) around `pos`, without fenced blocks and HTML comments."""
    fences = [m.span() for m in re.finditer(r"^```.*?^```$", text, re.S | re.M)]
    heads = [m.start() for m in re.finditer(r"^#{1,6} ", text, re.M) if not any(a < m.start() < b for a, b in fences)]
    start = max([h for h in heads if h <= pos], default=0)
    end = min([h for h in heads if h > pos], default=len(text))
    section = re.sub(r"^```.*?^```$", "", text[start:end], flags=re.S | re.M)
    return re.sub(r"<!--.*?-->", "", section, flags=re.S)


def parse_marker(spec: str) -> dict:
    out: dict = {"placeholders": {}}
    for part in spec.split(";"):
        key, _, value = part.strip().partition(":")
        value = value.strip()
        if key == "placeholders":
            for token, meaning in re.findall(r"`([^`]+)`([^`]*)", value):
                out["placeholders"][token] = meaning.strip(" ,")
        elif key in ("save", "same-as"):
            out[key.replace("-", "_")] = value
        elif not value and "name" not in out:
            out["name"] = key
        else:
            raise ValueError(f"unknown recipe marker field {key!r} in {spec!r}")
    return out


def doc_blocks() -> list[Block]:
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for m in MARKER.finditer(text):
            fields = parse_marker(m.group(1))
            blocks.append(
                Block(
                    page=page,
                    line=text.count("\n", 0, m.start()) + 1,
                    name=fields["name"],
                    lang=m.group(3),
                    text=m.group(4),
                    save=fields.get("save"),
                    same_as=fields.get("same_as"),
                    placeholders=fields["placeholders"],
                    prose=_prose(text, m.start()),
                )
            )
    return blocks


def recipe_blocks(name: str) -> list[Block]:
    """The blocks of a recipe that run (copies left out), in document order."""
    return [b for b in doc_blocks() if b.name == name and not b.same_as]


def fill(block: Block, values: dict[str, str]) -> str:
    """The block's text with its declared placeholders (and nothing else) replaced, longest token first, in one
    pass; a token matches only where it is not part of a longer word."""
    tokens = sorted(block.placeholders, key=len, reverse=True)
    if not tokens:
        return block.text
    pattern = re.compile("|".join(rf"(?<![\w]){re.escape(t)}(?![\w])" for t in tokens))
    return pattern.sub(lambda m: values[m.group(0)], block.text)


# ------------------------------------------------------------------------------------------------ the static checks
def test_every_recipe_in_the_docs_is_run():
    names = {b.name for b in doc_blocks()}
    assert names, "no recipe markers found in README.md or docs/"
    assert names == set(FILLS), (
        f"recipes without a runner: {sorted(names - set(FILLS))}; runners without a recipe: {sorted(set(FILLS) - names)}"
    )
    assert names == set(RUNNERS)


def test_every_block_of_the_recipes_page_is_a_recipe():
    text = (ROOT / "docs/recipes.md").read_text()
    fences = len(re.findall(r"^```\w+$", text, re.M))
    marked = [b for b in doc_blocks() if b.page.name == "recipes.md"]
    assert fences == len(marked), "docs/recipes.md: every fenced block there is a recipe and carries a marker"


@pytest.mark.parametrize("block", doc_blocks(), ids=lambda b: f"{b.name}@{b.where}")
def test_placeholders_are_declared_shown_and_filled(block):
    for token, meaning in block.placeholders.items():
        assert token in block.text, f"{block.where}: placeholder `{token}` is declared but not in the block"
        assert meaning, f"{block.where}: placeholder `{token}` does not say what it is"
        assert token in block.prose, f"{block.where}: placeholder `{token}` is not named in the text of its section"
    assert set(block.placeholders) <= set(FILLS[block.name]), f"{block.where}: a placeholder the tests do not fill"
    if block.save:  # the page tells the user where to save the file the test writes there
        assert f"`{block.save}`" in block.prose, f"{block.where}: the text does not say to save it as {block.save}"
    # No undeclared placeholder: what is left once the declared ones are taken out names nothing to replace.
    rest = block.text
    for token in sorted(block.placeholders, key=len, reverse=True):
        rest = rest.replace(token, "")
    rest = re.sub(r"\$\{?[A-Z_]+\}?|\b[A-Z_]+=", "", rest)  # shell variables and assignments
    rest = re.sub(r"#.*", "", rest) if block.lang in ("bash", "yaml", "python") else rest  # comments
    found = re.findall(r"/path/to/\S*|<[A-Za-z_ -]+>|\b[A-Z][A-Z0-9_]{2,}\b", rest)
    assert found == [], f"{block.where}: undeclared placeholder(s) {found}"
    if block.same_as:
        originals = [b.text for b in doc_blocks() if b.name == block.name and b.page == ROOT / block.same_as]
        assert block.text in originals, f"{block.where}: not identical to the {block.name} block of {block.same_as}"
        assert block.placeholders == next(
            b.placeholders for b in doc_blocks() if b.name == block.name and b.text == block.text and not b.same_as
        )


def test_fills_name_exactly_the_declared_placeholders():
    declared: dict[str, set] = defaultdict(set)
    for b in doc_blocks():
        declared[b.name] |= set(b.placeholders)
    for name, values in FILLS.items():
        assert set(values) == declared[name], (
            f"{name}: the tests fill {sorted(values)}, the docs declare {declared[name]}"
        )


def test_fill_replaces_whole_tokens_only():
    b = Block(ROOT / "README.md", 1, "x", "bash", "a 20000 b 120000 c/20000/d", placeholders={"20000": "n"})
    assert fill(b, {"20000": "2"}) == "a 2 b 120000 c/2/d"
    b = Block(
        ROOT / "README.md",
        1,
        "x",
        "bash",
        f'L="{LAUNCHER}" /path/to/siren/x',
        placeholders={LAUNCHER: "", "/path/to/siren": ""},
    )
    assert fill(b, {LAUNCHER: "siren", "/path/to/siren": "/r"}) == 'L="siren" /r/x'


# ---------------------------------------------------------------------------------------------------- running them
def recipe_env(base: Path) -> dict:
    """What a recipe's commands see: `siren` on the PATH (the venv's), W&B and the artifact index under `base`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SIREN_", "ACCELERATE_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(tracking_dirs(base))
    env.update(
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        WANDB__DISABLE_STATS="true",
        NETRC=str(base / "no-netrc"),
        # verify's and eval's quality scorers stubbed in the subprocesses (tests/controls/sitecustomize.py)
        SIREN_TEST_FAULT="verify_quality_stub,eval_quality_stub",
        PYTHONPATH=str(ROOT / "tests" / "controls"),
    )
    env.pop("PYTHONHOME", None)
    return env


@dataclass
class Ran:
    blocks: list[Block]
    procs: list[subprocess.CompletedProcess]
    cwd: Path

    @property
    def returncode(self) -> int:
        return self.procs[-1].returncode if self.procs else 0

    @property
    def out(self) -> str:
        return "".join(p.stdout for p in self.procs)

    def tail(self) -> str:
        p = self.procs[-1]
        return f"$ {p.args}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-5000:]}"


def run_recipe(name: str, cwd: Path, env: dict, values: dict[str, str], *, last_may_fail: bool = False) -> Ran:
    """Run the recipe's blocks in order in `cwd`; stop at the first that fails (the last may exit 1 with a verdict
    when `last_may_fail`)."""
    blocks = recipe_blocks(name)
    assert blocks, f"no recipe {name!r} in the docs"
    ran = Ran(blocks, [], cwd)
    scripts = cwd.parent / f".{cwd.name}-{name}-scripts"
    scripts.mkdir(exist_ok=True)
    for i, block in enumerate(blocks):
        text = fill(block, {t: values[t] for t in block.placeholders})
        if block.lang == "yaml":
            assert block.save, f"{block.where}: a yaml recipe block says where to save it (save: PATH)"
            (cwd / block.save).parent.mkdir(parents=True, exist_ok=True)
            (cwd / block.save).write_text(text)
            continue
        script = scripts / f"{i}.{'py' if block.lang == 'python' else 'sh'}"
        script.write_text(text)
        cmd = [sys.executable, str(script)] if block.lang == "python" else ["bash", "-euo", "pipefail", str(script)]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        ran.procs.append(proc)
        last = i == len(blocks) - 1
        if proc.returncode != 0 and not (last and last_may_fail and proc.returncode == 1):
            pytest.fail(f"recipe {name} ({block.where}) exited {proc.returncode}:\n{ran.tail()}")
    return ran


def _values(name: str, **where) -> dict[str, str]:
    return {t: v.format(root=ROOT, tests=ROOT / "tests", **where) for t, v in FILLS[name].items()}


def _audio_folder(corpus: Path, dest: Path, speakers: int = 4, per_speaker: int = 3) -> Path:
    """A folder of audio as a user has one: a sub-folder per speaker (the corpus's wavs, named <id>_<speaker>)."""
    by_speaker: dict[str, list[Path]] = defaultdict(list)
    for wav in sorted((corpus / "wavs").glob("*.wav")):
        by_speaker[wav.stem.split("_", 1)[1]].append(wav)
    for spk in sorted(by_speaker)[:speakers]:
        (dest / spk).mkdir(parents=True)
        for wav in by_speaker[spk][:per_speaker]:
            shutil.copy(wav, dest / spk / wav.name)
    return dest


@pytest.fixture(scope="module")
def project(corpus_dir, teacher_dir, tmp_path_factory):
    """The own-data recipe, run once from a scratch project directory: the base every other recipe reuses."""
    base = tmp_path_factory.mktemp("recipes")
    audio = _audio_folder(corpus_dir, base / "my_corpus")
    work = base / "project"
    work.mkdir()
    env = recipe_env(base / "env")
    values = _values("own-data", audio=audio, teacher=teacher_dir, project=work)
    ran = run_recipe("own-data", work, env, values, last_may_fail=True)
    return {"dir": work, "env": env, "ran": ran, "base": base, "teacher": teacher_dir, "corpus": corpus_dir}


def _run_byoc(project) -> Ran:
    from test_byoc_e2e import acme_yaml, write_acme_checkpoints

    work = project["dir"]
    acme = write_acme_checkpoints(project["base"] / "acme")
    config = acme_yaml(acme, project["teacher"])
    config["extends"] = "my/base.yaml"  # the doc's my_codec.yaml: beside my/, on the project's base config
    config.pop("tracking", None)
    (work / "my_codec.yaml").write_text(yaml.safe_dump(config))
    return run_recipe("byoc", work, project["env"], _values("byoc", project=work), last_may_fail=True)


def _some_wavs(project, n: int) -> list[Path]:
    rows = [json.loads(x) for x in (project["dir"] / "data/mine/val.jsonl").read_text().splitlines()]
    return [Path(r["path"]) for r in rows[:n]]


def _run_encode_decode(project) -> Ran:
    work = project["base"] / "anywhere-encode"
    (work / "recordings" / "sub").mkdir(parents=True)
    a, b, c = _some_wavs(project, 3)
    shutil.copy(a, work / "in.wav")
    shutil.copy(b, work / "more.wav")
    shutil.copy(c, work / "recordings" / "sub" / "c.wav")
    return run_recipe("encode-decode", work, project["env"], _values("encode-decode", project=project["dir"]))


def _run_python_api(project) -> Ran:
    work = project["base"] / "anywhere-python"
    work.mkdir()
    shutil.copy(_some_wavs(project, 1)[0], work / "speech.wav")
    return run_recipe("python-api", work, project["env"], _values("python-api", project=project["dir"]))


def _in_project(name):
    def run(project) -> Ran:
        return run_recipe(name, project["dir"], project["env"], _values(name, project=project["dir"]))

    return run


RUNNERS = {
    "own-data": None,  # the `project` fixture
    "byoc": _run_byoc,
    "share": _in_project("share"),
    "sweep": _in_project("sweep"),
    "eval": _in_project("eval"),
    "encode-decode": _run_encode_decode,
    "python-api": _run_python_api,
}


@pytest.fixture(scope="module")
def after_own_data(project):
    """Every other recipe, started together on the own-data project, two at a time."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(fn, project) for name, fn in RUNNERS.items() if fn is not None}
    yield futures
    pool.shutdown(wait=True)


def _result(after_own_data, name) -> Ran:
    return after_own_data[name].result()


def _verdict(ran: Ran, run_dir: Path, step: int) -> dict:
    """The verdict of a recipe's last command (`siren verify`): exit 0 (PASS) or 1 (FAIL), the verdict line, the
    report beside it; a FAIL only on the baseline floor a 2-step codec cannot reach."""
    assert ran.returncode in (0, 1), ran.tail()
    assert re.search(r"^\*\*(PASS|FAIL)\*\* on \d+ utterances", ran.procs[-1].stdout, re.M), ran.tail()
    reports = sorted((run_dir / "verify" / f"step_{step}").glob("*/report.json"))
    assert reports, f"no verify report under {run_dir}"
    report = json.loads(reports[-1].read_text())
    assert (reports[-1].parent / "report.html").is_file()
    assert report["passed"] == (ran.returncode == 0)
    return report


# ------------------------------------------------------------------------------------------------ the recipes' promises
def test_own_data_from_a_folder_of_audio_to_a_verdict(project):
    work = project["dir"]
    for split in ("train", "val", "rejected"):
        assert (work / f"data/mine/{split}.jsonl").is_file(), f"siren manifest did not write {split}.jsonl"
    val_speakers = {json.loads(x)["speaker"] for x in (work / "data/mine/val.jsonl").read_text().splitlines()}
    train_speakers = {json.loads(x)["speaker"] for x in (work / "data/mine/train.jsonl").read_text().splitlines()}
    assert val_speakers and train_speakers and not val_speakers & train_speakers  # split by speaker
    assert (work / "my/base.yaml").is_file()
    for stage in ("vocoder", "codec", "flow", "distill", "adapt"):
        run = work / "runs/mine" / stage
        assert (run / "checkpoints/latest").read_text().strip() == "step_2", stage
        meta = json.loads((run / "checkpoints/step_2/meta.json").read_text())
        assert meta["stage"] == stage
    assert any((work / "data/mine/cache").iterdir()), "the feature cache the base config names is empty"
    report = _verdict(project["ran"], work / "runs/mine/adapt", 2)
    failed = {c["threshold"] for c in report["checks"] if not c["ok"]}
    assert failed <= BASELINE_FLOOR, f"checks other than the collapsed baseline's floor failed: {failed}"
    assert {c["threshold"] for c in report["checks"]} >= BASELINE_FLOOR  # the floor is judged, not switched off
    consumed = json.loads((work / "runs/mine/adapt/checkpoints/step_2/meta.json").read_text())["consumed"]
    assert consumed["baseline"]["path"] == str(work / "runs/mine/codec/checkpoints/step_2")


def test_a_baseline_shared_by_uri(after_own_data, project):
    ran = _result(after_own_data, "share")
    run = project["dir"] / "runs/mine/adapt_shared"
    consumed = json.loads((run / "checkpoints/step_2/meta.json").read_text())["consumed"]["baseline"]
    assert consumed["uri"] == "wandb:local/siren-mine/codec-codec:latest", ran.tail()
    assert consumed["path"] == str(project["dir"] / "runs/mine/codec/checkpoints/step_2")


def test_a_sweep(after_own_data, project):
    ran = _result(after_own_data, "sweep")
    trials = sorted((project["dir"] / "runs/sweeps/mine_adapt_lr").glob("trial_*"))
    assert len(trials) == 1, ran.tail()
    assert (trials[0] / "checkpoints/latest").read_text().strip() == "step_2"
    assert "train/loss" in ran.out, ran.tail()


def test_eval_against_codec2(after_own_data, project):
    ran = _result(after_own_data, "eval")
    out = project["dir"] / "eval"
    table = (out / "eval.md").read_text()
    for system in ("original", "ours", "c2"):
        assert re.search(rf"^\| {system} \|", table, re.M), table
    assert "| system |" in ran.out
    result = json.loads((out / "eval.json").read_text())
    assert set(result["systems"]) >= {"ours", "c2"} and (out / "report.html").is_file()
    assert len({r["id"] for r in result["utterances"]}) == 2


def test_a_foreign_codec_imported_adapted_and_judged(after_own_data, project):
    ran = _result(after_own_data, "byoc")
    work = project["dir"]
    for stage in ("codec", "flow", "vocoder"):
        meta = json.loads((work / f"runs/acme_{stage}/checkpoints/step_0/meta.json").read_text())
        assert meta["stage"] == stage and meta["imported"]["sources"], stage
    adapt_meta = json.loads((work / "runs/acme_adapt/checkpoints/step_2/meta.json").read_text())
    assert adapt_meta["targets"]["decoder"]["target"] == "acme_codec.nets:WaveSynth"
    _verdict(ran, work / "runs/acme_adapt", 2)


def test_encode_and_decode_files(after_own_data):
    ran = _result(after_own_data, "encode-decode")
    work = ran.cwd
    for f in ("out.siren", "out.wav", "coded/more.siren", "coded/sub/c.siren", "decoded/more.wav", "decoded/sub/c.wav"):
        assert (work / f).is_file(), f"{f} missing:\n{ran.tail()}"
    # a codec gives back what it was given: the decoded file has its input's length
    assert sf.info(str(work / "out.wav")).frames == sf.info(str(work / "in.wav")).frames


def test_the_python_api(after_own_data):
    ran = _result(after_own_data, "python-api")
    work = ran.cwd
    assert sf.info(str(work / "decoded.wav")).frames == sf.info(str(work / "speech.wav")).frames, ran.tail()


@pytest.mark.parametrize("name", [n for n, fn in RUNNERS.items() if fn is not None])
def test_every_recipe_ran_to_its_end(after_own_data, name):
    """Each recipe other than own-data (checked above) ran every block; any exit other than a verdict failed it."""
    ran = _result(after_own_data, name)
    assert len(ran.procs) == len([b for b in ran.blocks if b.lang != "yaml"]), ran.tail()
