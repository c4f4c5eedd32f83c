"""The install: the lock satisfies setup.cfg, the venv matches the lock, the check catches a library that won't load,
and a venv without pip is rebuilt."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from siren import install_check

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def _requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in ("dev", "sweeps", "eval"):
        lines += cfg["options.extras_require"][extra].splitlines()
    lines += (ROOT / "requirements-build.in").read_text().splitlines()
    return [Requirement(x.strip()) for x in lines if x.strip() and not x.strip().startswith("#")]


def unsatisfied(requirements: list[Requirement], pins: dict[str, str]) -> list[str]:
    bad = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = pins.get(install_check._canon(req.name))
        if version is None:
            bad.append(f"{req.name}: not in the lock")
        elif not req.specifier.contains(version, prereleases=True):
            bad.append(f"{req.name}{req.specifier}: the lock has {version}")
    return bad


def test_lock_satisfies_every_requirement_of_setup_cfg():
    pins = install_check.read_lock(LOCK)
    assert len(pins) > 50  # transitive, not only the direct requirements
    assert unsatisfied(_requirements(), pins) == [], "setup.cfg changed without `make lock`"


def test_a_requirement_the_lock_does_not_satisfy_is_reported():
    # The control for the test above: a new dependency, and a range that excludes the locked version.
    pins = install_check.read_lock(LOCK)
    reqs = [Requirement("some-new-dependency>=1"), Requirement(f"torch>{pins['torch']}"), Requirement("einops")]
    bad = unsatisfied(reqs, pins)
    assert len(bad) == 2 and "some-new-dependency" in bad[0] and "torch" in bad[1]


def test_torch_and_torchaudio_are_pinned_exactly_and_together():
    # torchaudio's compiled extension only loads with the torch it was built for: a range would let a patch release in.
    reqs = {r.name: r for r in _requirements()}
    for name in ("torch", "torchaudio"):
        (spec,) = reqs[name].specifier
        assert spec.operator == "==" and "*" not in spec.version
    pins = install_check.read_lock(LOCK)
    assert pins["torch"] == pins["torchaudio"]


def test_the_lock_pins_hashes():
    text = LOCK.read_text()
    pinned = [ln for ln in text.splitlines() if install_check._PIN.match(ln)]
    assert pinned and all(ln.rstrip().endswith("\\") for ln in pinned), "every pin carries --hash lines"


def test_the_installed_versions_equal_the_lock():
    assert install_check.version_problems(install_check.read_lock(LOCK)) == []


def test_version_problems_name_package_and_both_versions(tmp_path):
    assert install_check.version_problems({"torch": "0.0.1", "no-such-package-xyz": "1.0"}) == [
        "no-such-package-xyz: locked at 1.0, not installed",
        f"torch: locked at 0.0.1, installed {install_check.md.version('torch')}",
    ]


def test_every_compiled_library_loads():
    assert install_check.library_problems() == []


def test_a_library_that_does_not_load_fails_the_check_naming_package_and_version(tmp_path):
    # Shadow constriction with a module whose import fails the way a broken extension does.
    (tmp_path / "constriction.py").write_text("raise OSError('libconstriction.so: undefined symbol: xyz')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "siren.install_check", "--lock", str(LOCK)],
        cwd=ROOT,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    version = install_check.md.version("constriction")
    assert f"constriction {version} does not load: OSError: libconstriction.so: undefined symbol" in proc.stderr
    assert "torch" not in proc.stderr.split("problem(s)")[1].split("fix:")[0]  # only the broken one is named


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_venv_without_pip_is_rebuilt(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    assert subprocess.run([venv / "bin/python", "-m", "pip", "--version"], capture_output=True).returncode != 0
    base = Path(sys.base_prefix) / "bin" / "python3"
    proc = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "venv", f"VENV={venv}", f"PY={base}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cannot install (no working pip): rebuilding it" in proc.stdout
    assert subprocess.run([venv / "bin/python", "-m", "pip", "--version"], capture_output=True).returncode == 0
    # A working venv is left alone.
    again = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "venv", f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "rebuilding" not in again.stdout
