"""The cache under crashes and concurrency: each fault injected, each fix checked, and each check rerun with its
mechanism switched off (the naive code the cache had before) to show that it fails then.

Faults: a kill between the two renames of a shard commit; an empty or truncated index (what a node crash can leave);
a shard removed (by another rank or job) between listing and loading; another job's live temp files in the same cache
directory; renames that a node crash could undo (no fsync)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cache import HOP, Counting, frame_features, make, make_ds

from siren.data import cache as cache_mod
from siren.data.cache import CacheCorrupt, ShardCache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ds(tmp_path):
    return make_ds(tmp_path)


# -------------------------------------------------------------------------------- the mechanisms switched off
def naive_recover(self) -> None:
    """Rank 0 deletes every temp file of the cache dir, whoever wrote it, and adopts nothing."""
    for tmp in self.dir.glob("*.tmp"):
        tmp.unlink(missing_ok=True)


def naive_read_index(idx: Path) -> dict:
    """Read an index trusting that it exists and is whole."""
    with np.load(idx) as z:
        out = {k: z[k] for k in ("positions", "offsets", "frames", "bad", "nbytes", "crc")}
        out["meta"] = json.loads(str(z["meta"]))
    return out


def naive_map(self, k: int) -> np.memmap:
    return np.memmap(self.bins[k], dtype=np.uint8, mode="r")


def naive_write_tmp(final: Path, token: str, write: Callable) -> Path:
    tmp = cache_mod._tmp_path(final, token)
    with tmp.open("wb") as f:
        write(f)
    return tmp


def naive_publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def check(mechanism: str, monkeypatch, off: list[tuple[object, str, object]], raises, scenario: Callable) -> None:
    """Run `scenario`; with mechanism "off", patch in the naive code first and require the scenario to fail with
    `raises` (so the check cannot pass without the mechanism)."""
    if mechanism == "on":
        scenario()
        return
    for target, name, naive in off:
        monkeypatch.setattr(target, name, naive)
    with pytest.raises(raises):
        scenario()


MECHANISM = pytest.mark.parametrize("mechanism", ["on", "off"])


def entries_match(ds, cache: ShardCache) -> None:
    view = cache.view({"t": (HOP, None)})
    for j in range(len(ds)):
        want = frame_features(ds.load_full(j))
        assert torch.allclose(torch.from_numpy(view.entry(j)["features"].astype(np.float32)), want, atol=1e-3)


def orphans(d: Path) -> list[str]:
    """Shard data without an index."""
    return sorted(b.name for b in d.glob("*.bin") if not b.with_name(b.name[: -len(".bin")] + ".idx.npz").exists())


# ----------------------------------------------------------------------------------------------- kill between renames
@MECHANISM
def test_kill_between_the_two_renames_leaves_a_shard_that_the_next_start_adopts(ds, tmp_path, monkeypatch, mechanism):
    real = os.replace

    def scenario():
        root = tmp_path / mechanism
        renames = []

        def killing_replace(src, dst):
            if str(dst).endswith(".idx.npz"):
                renames.append(dst)
                if len(renames) == 3:  # the third shard: data renamed, index not yet
                    raise KeyboardInterrupt("killed between the two renames")
            return real(src, dst)

        with monkeypatch.context() as m:
            m.setattr(os, "replace", killing_replace)
            with pytest.raises(KeyboardInterrupt):
                make(ds, root, shard_bytes=1).ensure(ds.load_full, Counting(), progress=False)
        cache = make(ds, root, shard_bytes=1)
        assert len(orphans(cache.dir)) == 1 and len(list(cache.dir.glob("*.tmp"))) == 1
        comp = Counting()
        rep = cache.ensure(ds.load_full, comp, progress=False)
        assert rep == {"computed": 4, "reused": 3, "total": 7} and comp.seen == 4  # the third shard was adopted
        assert orphans(cache.dir) == [] and not list(cache.dir.glob("*.tmp"))
        entries_match(ds, make(ds, root))

    check(mechanism, monkeypatch, [(ShardCache, "_recover", naive_recover)], AssertionError, scenario)


KILLED_FILL = """
import json, os, sys
from siren.data.cache import Field, ShardCache
from siren.data.datasets import AudioDataset
from siren.data.manifest import Utterance
utts = [Utterance(**u) for u in json.loads(sys.argv[2])]
ds = AudioDataset(utts, 16000, segment_samples=8000, min_samples=100, seed=0)
cache = ShardCache(sys.argv[1], "features", {"model": "fp-a", "layer": 3}, [Field("features", "t", "float16")],
                   ds.table, ds.rows, shard_bytes=1)
real, n = os.replace, [0]
def replace(src, dst):
    if str(dst).endswith(".idx.npz"):
        n[0] += 1
        if n[0] == 2:
            os._exit(9)  # the process dies between the data's rename and the index's
    return real(src, dst)
os.replace = replace
import torch
def compute(wavs):
    out = []
    for w in wavs:
        f = w[: w.shape[0] // 320 * 320].reshape(-1, 320).mean(-1, keepdim=True)
        out.append({"features": f * torch.arange(1, 5, dtype=w.dtype)})
    return out
cache.ensure(ds.load_full, compute, progress=False)
"""


def test_a_killed_process_between_the_renames_is_adopted_by_the_next_one(ds, tmp_path, subprocess_env):
    """A real kill (another process, now dead): its index temp file names a dead pid of this host, so the next
    start adopts the pair without waiting for the stale age."""
    utts = [
        {
            "id": ds.table.ids[int(r)],
            "path": ds.table.path(int(r)),
            "duration": float(ds.table.duration[r]),
            "speaker": "s",
        }
        for r in ds.rows
    ]
    r = subprocess.run(
        [sys.executable, "-c", KILLED_FILL, str(tmp_path / "c"), json.dumps(utts)],
        env=subprocess_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 9, r.stderr[-2000:]
    cache = make(ds, tmp_path / "c", shard_bytes=1)
    assert len(orphans(cache.dir)) == 1
    comp = Counting()
    rep = cache.ensure(ds.load_full, comp, progress=False)
    assert rep["reused"] == 2 and comp.seen == 5 and orphans(cache.dir) == []
    entries_match(ds, make(ds, tmp_path / "c"))


# ------------------------------------------------------------------------------------------------ damaged index
@MECHANISM
@pytest.mark.parametrize("damage", ["empty", "truncated"])
@pytest.mark.parametrize("verify", [True, False])
def test_an_empty_or_truncated_index_is_set_aside_and_rebuilt(
    ds, tmp_path, monkeypatch, caplog, mechanism, damage, verify
):
    def scenario():
        root = tmp_path / mechanism
        make(ds, root, shard_bytes=1).ensure(ds.load_full, Counting(), progress=False)
        cache = make(ds, root, shard_bytes=1)
        victim = sorted(cache.dir.glob("*.idx.npz"))[3]
        data = victim.read_bytes()
        victim.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
        comp = Counting()
        with caplog.at_level(logging.WARNING, logger="siren"):
            rep = cache.ensure(ds.load_full, comp, progress=False, verify=verify)
        assert rep["computed"] == 1 and comp.seen == 1
        assert any(victim.name in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
        assert not victim.exists() and orphans(cache.dir) == []  # set aside and removed, like a damaged shard
        again = Counting()
        assert make(ds, root, shard_bytes=1).ensure(ds.load_full, again, progress=False)["computed"] == 0
        entries_match(ds, make(ds, root))

    raises = EOFError if damage == "empty" else Exception  # truncated: zipfile.BadZipFile or ValueError
    check(mechanism, monkeypatch, [(ShardCache, "_read_index", staticmethod(naive_read_index))], raises, scenario)


# ------------------------------------------------------------------------------------ shard vanishing mid-read
@MECHANISM
@pytest.mark.parametrize("when", ["verify", "index"])
def test_a_shard_removed_between_listing_and_loading_counts_as_missing(ds, tmp_path, monkeypatch, mechanism, when):
    """What another rank (or job) removing a damaged shard does to a rank that has just listed the directory."""
    real_shards = ShardCache._shards

    def scenario():
        root = tmp_path / mechanism
        make(ds, root, shard_bytes=1).ensure(ds.load_full, Counting(), progress=False)
        calls = []

        def listing_then_removal(self, *, trusted):
            out = real_shards(self, trusted=trusted)
            calls.append(trusted)
            if (when == "verify" and not trusted) or (when == "index" and trusted and len(calls) == 2):
                victim = out[2]
                victim.unlink()
                self._bin(victim).unlink()
            return out

        with monkeypatch.context() as m:
            m.setattr(ShardCache, "_shards", listing_then_removal)
            comp = Counting()
            rep = make(ds, root, shard_bytes=1).ensure(ds.load_full, comp, progress=False)
        assert rep["computed"] == 1 and comp.seen == 1  # a miss, recomputed
        assert not list(make(ds, root).dir.glob("*.corrupt"))  # a vanished shard is not reported as damaged
        entries_match(ds, make(ds, root))

    check(
        mechanism,
        monkeypatch,
        [(ShardCache, "_read_index", staticmethod(naive_read_index))],
        FileNotFoundError,
        scenario,
    )


@MECHANISM
def test_a_shard_removed_after_indexing_gives_a_clear_error_in_the_reader(ds, tmp_path, monkeypatch, mechanism):
    def scenario():
        cache = make(ds, tmp_path / mechanism, shard_bytes=1)
        cache.ensure(ds.load_full, Counting(), progress=False)
        view = cache.view({"t": (HOP, None)})
        k = int(view.shard[4])
        Path(view.bins[k]).unlink()
        with pytest.raises(CacheCorrupt, match="vanished.*run again"):
            view.entry(4)

    check(mechanism, monkeypatch, [(cache_mod.CacheView, "_map", naive_map)], FileNotFoundError, scenario)


# ------------------------------------------------------------------------------------ temp files of other jobs
def owned_tmp(final: Path, pid: int, *, machine: str | None = None, age: float = 0.0, token="0badcafe") -> Path:
    """A temp file as writer `pid` names it (`machine`: another host's name)."""
    start = cache_mod._start_time(pid)
    tmp = final.with_name(f"{final.name}.{token}~{pid}~{start}~{machine or cache_mod._MACHINE}.tmp")
    tmp.write_bytes(b"partial")
    if age:
        t = time.time() - age
        os.utime(tmp, (t, t))
    return tmp


@MECHANISM
def test_only_temp_files_of_dead_writers_are_removed(ds, tmp_path, monkeypatch, mechanism):
    def scenario():
        cache = make(ds, tmp_path / mechanism, shard_bytes=1)
        cache.ensure(ds.load_full, Counting(), progress=False)
        d = cache.dir
        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        try:
            hour = cache_mod.STALE_SECONDS + 60
            keep = [
                owned_tmp(d / "shard-aaaaaaaa-00000.bin", live.pid),  # a second job on this host, writing
                owned_tmp(d / "shard-bbbbbbbb-00000.bin", live.pid, age=hour),  # alive, however old
                owned_tmp(d / "shard-cccccccc-00000.bin", 4242, machine="other-node@12345678"),  # another host, fresh
                d / "shard-dddddddd-00000.bin.tmp",  # no owner in the name, fresh
            ]
            keep[-1].write_bytes(b"x")
            # A second job between its two renames: data in place, index still its temp file; not to be adopted.
            (d / "shard-eeeeeeee-00000.bin").write_bytes(b"data")
            keep.append(owned_tmp(d / "shard-eeeeeeee-00000.idx.npz", live.pid))
            gone = [
                owned_tmp(d / "shard-ffffffff-00000.bin", dead.pid),  # a dead writer of this host, however fresh
                owned_tmp(d / "shard-99999999-00000.bin", 4242, machine="other-node@12345678", age=hour),
                d / "shard-88888888-00000.bin.tmp",  # no owner, old
            ]
            gone[-1].write_bytes(b"x")
            t = time.time() - hour
            os.utime(gone[-1], (t, t))
            comp = Counting()
            assert cache.ensure(ds.load_full, comp, progress=False)["computed"] == 0 and comp.seen == 0
            assert [p.name for p in keep if not p.exists()] == []
            assert [p.name for p in gone if p.exists()] == []
            assert not (d / "shard-eeeeeeee-00000.idx.npz").exists()  # the live job renames it itself
        finally:
            live.kill()
            live.wait()

    check(mechanism, monkeypatch, [(ShardCache, "_recover", naive_recover)], AssertionError, scenario)


@MECHANISM
def test_shard_data_without_any_index_is_removed_once_stale(ds, tmp_path, monkeypatch, mechanism):
    """Data whose index (and index temp file) is gone, e.g. deleted by hand: removed once older than the stale age,
    kept while fresh (no writer of this version leaves that state, so only age is trusted)."""

    def scenario():
        cache = make(ds, tmp_path / mechanism, shard_bytes=1)
        cache.ensure(ds.load_full, Counting(), progress=False)
        fresh, old = cache.dir / "shard-77777777-00000.bin", cache.dir / "shard-66666666-00000.bin"
        for p in (fresh, old):
            p.write_bytes(b"data")
        t = time.time() - cache_mod.STALE_SECONDS - 60
        os.utime(old, (t, t))
        make(ds, tmp_path / mechanism, shard_bytes=1).ensure(ds.load_full, Counting(), progress=False)
        assert fresh.exists() and not old.exists()

    check(mechanism, monkeypatch, [(ShardCache, "_recover", naive_recover)], AssertionError, scenario)


@MECHANISM
def test_a_second_job_starting_mid_commit_keeps_the_first_jobs_files(ds, tmp_path, monkeypatch, mechanism):
    """Job A (world 1) stops inside a commit, after writing its temp files; job B starts on the same cache, recovers
    and fills; then A renames its files into place. Forced interleaving, two jobs in one process."""
    real_publish = cache_mod._publish

    def scenario():
        root = tmp_path / mechanism
        paused, resume, errors = threading.Event(), threading.Event(), []

        def publish(tmp, final):
            if threading.current_thread().name == "job-a" and final.name.endswith(".bin") and not paused.is_set():
                paused.set()
                assert resume.wait(60)
            real_publish(tmp, final)

        def job_a():
            try:
                make(ds, root, shard_bytes=1 << 20).ensure(ds.load_full, Counting(), progress=False)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        with monkeypatch.context() as m:
            m.setattr(cache_mod, "_publish", publish)
            a = threading.Thread(target=job_a, name="job-a")
            a.start()
            assert paused.wait(60)
            b = make(ds, root, shard_bytes=1 << 20).ensure(ds.load_full, Counting(), progress=False)
            resume.set()
            a.join()
        assert not errors, errors
        assert b["computed"] == 7  # A's shard did not exist yet
        assert not list(make(ds, root).dir.glob("*.tmp")) and orphans(make(ds, root).dir) == []
        entries_match(ds, make(ds, root))

    check(mechanism, monkeypatch, [(ShardCache, "_recover", naive_recover)], AssertionError, scenario)


# --------------------------------------------------------------------------------------------------- durability
@MECHANISM
@pytest.mark.parametrize("step", ["file", "dir"])
def test_every_file_is_fsynced_before_its_rename_and_the_dir_after(ds, tmp_path, monkeypatch, mechanism, step):
    real_fsync, real_replace = os.fsync, os.replace

    def scenario():
        events = []

        def fsync(fd):
            events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def replace(src, dst):
            events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
            return real_replace(src, dst)

        cache = make(ds, tmp_path / f"{mechanism}-{step}", shard_bytes=1)
        with monkeypatch.context() as m:
            m.setattr(os, "fsync", fsync)
            m.setattr(os, "replace", replace)
            cache.ensure(ds.load_full, Counting(), progress=False)
        renames = [(i, e) for i, e in enumerate(events) if e[0] == "replace"]
        finals = {Path(e[2]).name for _, e in renames}
        assert "key.json" in finals and sum(n.endswith(".idx.npz") for n in finals) == 7
        assert sum(n.endswith(".bin") for n in finals) == 7
        for i, (_, src, dst) in renames:
            assert ("fsync", src) in events[:i], f"{Path(dst).name} renamed into place before its data was fsynced"
            assert events[i + 1 : i + 2] == [("fsync", str(Path(dst).parent))], f"directory not fsynced after {dst}"

    off = (cache_mod, "_write_tmp", naive_write_tmp) if step == "file" else (cache_mod, "_publish", naive_publish)
    check(mechanism, monkeypatch, [off], AssertionError, scenario)
