"""`edgeact flash`: the robot's bundle store. Bundles are installed whole or not at all, `current` switches in one
rename, `previous` rolls back, and a run started on `current` keeps the bundle it started with."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeact.runtime import bundle_store
from edgeact.runtime.bundle import load_bundle, manifest_sha256, read_manifest
from edgeact.runtime.bundle_store import CURRENT, PREVIOUS, BundleStore, entry_id
from edgeact.runtime.cli import main
from edgeact.runtime.errors import BundleError, ConfigError, EdgeactError
from tests.runtime.test_bundle import DECODER_RANGES, KILL_AFTER_MOVING_ASIDE, write_tiny_bundle

pytestmark = pytest.mark.timeout(120)


def tiny(path: Path, k: int = 0, **kw) -> Path:
    """A tiny bundle; each k gives another manifest (the decoder's largest sequence), so another store entry."""
    ranges = {**DECODER_RANGES, "seq": (1, 16, 64 + k)}
    return write_tiny_bundle(path, dim_ranges=ranges, **kw)


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def visible(store: BundleStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if not p.name.startswith("."))


def test_flash_installs_a_checked_copy_and_makes_it_current(tmp_path):
    src = tiny(tmp_path / "bundle-int8")
    before = files_of(src)
    store = BundleStore(tmp_path / "store")
    result = store.flash(src)

    expected_id = f"bundle-int8-{manifest_sha256(src)[:12]}"
    assert result.id == expected_id == entry_id(src, manifest_sha256(src)) and result.copied and result.activated
    assert files_of(store.root / expected_id) == before == files_of(src)     # the same bytes; the source untouched
    assert os.readlink(store.root / CURRENT) == expected_id                   # relative: the store can move
    assert load_bundle(store.root / CURRENT).manifest.model.name == "tiny-sim"
    assert visible(store) == sorted([expected_id, CURRENT, "history.jsonl"])
    actions = [(r["action"], r["bundle"]) for r in store.history()]
    assert actions == [("install", expected_id), ("switch", expected_id)]
    assert store.history()[0]["source"] == str(src.resolve())


def test_the_same_bundle_twice_is_one_entry_and_a_damaged_entry_is_installed_again(tmp_path):
    src = tiny(tmp_path / "b")
    store = BundleStore(tmp_path / "store")
    first = store.flash(src)
    again = store.flash(src)
    assert not again.copied and again.id == first.id and store.ids() == [first.id]
    onnx = store.root / first.id / "stages" / "decoder.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF                                # same size: only the sha256 tells
    onnx.write_bytes(bytes(data))
    notes = []
    third = store.flash(src, on_step=notes.append)
    assert third.copied and "installed but damaged" in notes[0] and "sha256 mismatch" in notes[0]
    load_bundle(store.root / CURRENT)               # whole again
    assert not [p for p in store.root.iterdir() if p.name.startswith(f".{first.id}")]


def test_a_new_bundle_keeps_the_old_as_previous_and_rollback_swaps_them(tmp_path):
    store = BundleStore(tmp_path / "store")
    a = store.flash(tiny(tmp_path / "a", 0))
    b = store.flash(tiny(tmp_path / "b", 1))
    assert b.previous == a.id
    assert store.link_target(CURRENT) == b.id and store.link_target(PREVIOUS) == a.id

    assert store.rollback() == (a.id, b.id)
    assert store.link_target(CURRENT) == a.id and store.link_target(PREVIOUS) == b.id
    assert store.rollback() == (b.id, a.id)          # and back
    assert store.use(a.id[:3]) == (a.id, b.id)       # a unique prefix is enough
    assert [r["action"] for r in store.history()][-3:] == ["rollback", "rollback", "switch"]

    with pytest.raises(ConfigError, match=r"is the current bundle .* --rollback, or --use ID"):
        store.remove(a.id)
    assert store.remove(b.id) == b.id                # the previous one may go; the link goes with it
    assert store.ids() == [a.id] and store.link_target(PREVIOUS) is None
    with pytest.raises(ConfigError, match="no previous bundle to roll back to"):
        store.rollback()
    with pytest.raises(ConfigError, match=r"'zzz' is not installed in .*; installed: " + a.id):
        store.use("zzz")


def test_a_corrupt_or_unverified_source_is_refused_and_nothing_changes(tmp_path):
    store = BundleStore(tmp_path / "store")
    good = store.flash(tiny(tmp_path / "good", 0))
    bad = tiny(tmp_path / "bad", 1)
    onnx = bad / "stages" / "decoder.onnx"
    data = bytearray(onnx.read_bytes())
    data[0] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"decoder.onnx: sha256 mismatch in the source bundle .* nothing was installed"):
        store.flash(bad)
    failed = tiny(tmp_path / "failed", 2, verification="failed")
    with pytest.raises(BundleError, match="verification failed at gate .*--allow-unverified to edgeact flash"):
        store.flash(failed)
    assert store.ids() == [good.id] and store.link_target(CURRENT) == good.id
    assert not [p for p in store.root.iterdir() if p.name.startswith(".") and p.is_dir()]   # no partial copy left

    allowed = store.flash(failed, allow_unverified=True)
    assert store.link_target(CURRENT) == allowed.id


def test_a_manifest_rewritten_during_the_copy_is_not_installed(tmp_path, monkeypatch):
    """`edgeact verify SOURCE` recording a failed verdict while the files copy: the manifest checked is not the one
    the copy would hold, so nothing is installed (it was installed and made current, then refused to load)."""
    from edgeact.export.bundle_writer import update_manifest
    from edgeact.runtime.bundle_manifest import VerificationInfo
    from tests.runtime.test_bundle import FAILED_RESULTS

    store = BundleStore(tmp_path / "store")
    good = store.flash(tiny(tmp_path / "good", 0))
    src = tiny(tmp_path / "src", 1, verification="not_run")
    real = bundle_store._copy_file

    def copy_file(s, d):
        if s.name == "manifest.json":
            update_manifest(src, lambda m: setattr(m, "verification", VerificationInfo("failed", {}, FAILED_RESULTS)))
        return real(s, d)

    monkeypatch.setattr(bundle_store, "_copy_file", copy_file)
    with pytest.raises(BundleError, match=r"manifest.json changed while the bundle was copied .* nothing was installed "
                                          r"or switched"):
        store.flash(src)
    assert store.ids() == [good.id] and store.link_target(CURRENT) == good.id


def test_a_source_whose_graph_reads_an_unlisted_file_is_named_not_blamed_on_the_storage(tmp_path):
    from tests.runtime.test_bundle import _relist, _set_location

    store = BundleStore(tmp_path / "store")
    src = write_tiny_bundle(tmp_path / "src", external_data=True)
    (src / "stages" / "extra.bin").write_bytes((src / "stages" / "decoder.onnx.data").read_bytes())
    _set_location(src / "stages" / "decoder.onnx", "extra.bin")
    _relist(src, "stages/decoder.onnx")
    with pytest.raises(BundleError) as refused:
        store.flash(src)
    said = str(refused.value)
    assert f"stage 'decoder' ({src}/stages/decoder.onnx): its graph reads external data from 'extra.bin'" in said
    assert said.endswith("nothing was installed or switched") and "storage" not in said
    assert store.ids() == []


def test_a_source_with_a_linked_folder_is_installed_as_plain_files(tmp_path):
    """flash hashes what it reads through the link and installs plain files (the robot's copy has no link)."""
    store = BundleStore(tmp_path / "store")
    src = tiny(tmp_path / "src")
    (src / "weights").rename(tmp_path / "shared-weights")
    (src / "weights").symlink_to(tmp_path / "shared-weights")
    done = store.flash(src)
    assert not (done.path / "weights").is_symlink() and load_bundle(store.root / CURRENT)


def test_a_copy_that_reads_back_other_bytes_is_refused(tmp_path, monkeypatch):
    """Failing storage: the bytes written are not the bytes read back. Caught at install, not at the first plan."""
    store = BundleStore(tmp_path / "store")
    good = store.flash(tiny(tmp_path / "good", 0))
    real = bundle_store._copy_file

    def flaky_storage(src: Path, dst: Path) -> str:
        digest = real(src, dst)
        if dst.name == "decoder.onnx":
            data = bytearray(dst.read_bytes())
            data[len(data) // 2] ^= 0x01
            dst.write_bytes(bytes(data))
        return digest

    monkeypatch.setattr(bundle_store, "_copy_file", flaky_storage)
    with pytest.raises(BundleError, match=r"the copy does not read back as written .*decoder.onnx: sha256 mismatch"
                                          r".*storage may be failing .* nothing was installed or switched"):
        store.flash(tiny(tmp_path / "new", 1))
    assert store.ids() == [good.id] and store.link_target(CURRENT) == good.id


_KILLED_FLASH = (
    # A real kill (os._exit skips every cleanup, like SIGKILL or a power cut) after the first file was copied.
    "import os, sys\n"
    "from edgeact.runtime import bundle_store\n"
    "real = bundle_store._copy_file\n"
    "def copy(src, dst):\n"
    "    digest = real(src, dst)\n"
    "    os._exit(9)\n"
    "bundle_store._copy_file = copy\n"
    "bundle_store.BundleStore(sys.argv[1]).flash(sys.argv[2])\n"
)


def test_a_killed_install_leaves_current_as_it_was_and_is_cleared_later(tmp_path):
    store = BundleStore(tmp_path / "store")
    good = store.flash(tiny(tmp_path / "good", 0))
    new = tiny(tmp_path / "new", 1)
    proc = subprocess.run([sys.executable, "-c", _KILLED_FLASH, str(store.root), str(new)], cwd=Path.cwd(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    partial = [p for p in store.root.iterdir() if ".partial-" in p.name]
    assert len(partial) == 1 and partial[0].name.startswith(".new-")
    assert store.ids() == [good.id] and load_bundle(store.root / CURRENT).root.resolve().name == good.id
    with pytest.raises(BundleError, match="no bundle here"):
        load_bundle(store.root / entry_id(new, manifest_sha256(new)))          # the partial is never taken

    done = store.flash(new)                          # the next operation clears what the killed one left
    assert done.copied and not [p for p in store.root.iterdir() if ".partial-" in p.name]
    assert store.link_target(CURRENT) == done.id


def test_not_enough_space_is_refused_before_copying(tmp_path, monkeypatch):
    store = BundleStore(tmp_path / "store")
    src = tiny(tmp_path / "b")
    free = 100 << 20                                 # under the bundle plus the 256 MiB kept free
    monkeypatch.setattr(bundle_store.shutil, "disk_usage",
                        lambda path: type("Usage", (), {"free": free, "total": 1 << 40, "used": 0})())
    with pytest.raises(ConfigError, match=r"100.0 MiB free, and installing b-[0-9a-f]{12} needs 0.1 MiB plus 256.0 "
                                          r"MiB kept free; remove old bundles .*--keep N"):
        store.flash(src)
    assert store.ids() == [] and store.link_target(CURRENT) is None


def test_keep_removes_the_oldest_but_never_current_or_previous(tmp_path):
    store = BundleStore(tmp_path / "store")
    ids = [store.flash(tiny(tmp_path / f"b{k}", k)).id for k in range(3)]
    store.use(ids[0])                                # current: the oldest; previous: the newest
    result = store.flash(tiny(tmp_path / "b3", 3), activate=False, keep=3)
    assert result.removed == (ids[1],) and not result.activated
    assert store.ids() == sorted([ids[0], ids[2], result.id])
    assert store.link_target(CURRENT) == ids[0] and store.link_target(PREVIOUS) == ids[2]
    with pytest.raises(ConfigError, match="keep at least 2"):
        store.flash(tiny(tmp_path / "b4", 4), keep=1)


def test_one_store_operation_at_a_time(tmp_path):
    store = BundleStore(tmp_path / "store")
    src = tiny(tmp_path / "b")
    with store.locked():
        with pytest.raises(ConfigError, match="another edgeact flash is working on this store"):
            BundleStore(store.root).flash(src)
    assert store.flash(src).copied


def test_engines_for_a_target_are_built_in_the_store_copy(tmp_path, monkeypatch):
    from edgeact.export import engines
    from tests.export.test_engines import TENSORRT_MISSING, fake_tensorrt

    monkeypatch.setattr(engines, "device_compute_capability", lambda device=0: (8, 7))
    store = BundleStore(tmp_path / "store")
    src = tiny(tmp_path / "b")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EdgeactError) as err:         # found before anything is copied
        store.flash(src, target="orin")
    assert str(err.value) == TENSORRT_MISSING and store.ids() == []

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt({}))
    result = store.flash(src, target="orin")
    installed = load_bundle(store.root / CURRENT)
    assert result.engines_built == ("decoder",) and installed.engine("decoder", "orin") is not None
    assert (store.root / result.id / "engines/orin/decoder.plan").is_file()
    assert not (src / "engines").exists()            # built in the store's copy, not in the source
    assert not store.flash(src, target="orin").copied            # whole with its engines: nothing to do
    assert store.history()[0]["engines"] == ["decoder"]


def test_the_cli_installs_lists_and_rolls_back(tmp_path, capsys):
    store = tmp_path / "store"
    a, b = tiny(tmp_path / "a", 0), tiny(tmp_path / "b", 1)
    assert main(["flash", str(a), "--store", str(store)]) == 0
    assert main(["flash", str(b), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    id_a, id_b = (entry_id(p, manifest_sha256(p)) for p in (a, b))
    assert f"current: {id_b} (was {id_a}; now previous, for --rollback)" in out
    assert f"policy.path: {store / 'current'}" in out
    assert main(["flash", "--rollback", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"rolled back: current is {id_a} again, previous is {id_b}" in out
    row = next(line for line in out.splitlines() if id_a in line and "│" in line)
    assert "current" in row and "tiny-sim" in row and "passed" in row
    assert main(["flash", str(a), "--list", "--store", str(store)]) == 2
    assert "give BUNDLE to install it, or --list, not both" in capsys.readouterr().err
    assert main(["flash", "--store", str(store)]) == 2
    assert "nothing to do" in capsys.readouterr().err


def test_a_run_pins_the_bundle_current_names_when_it_starts(tmp_path, monkeypatch):
    """The policy's process and the summary load what was checked, even if `current` switches meanwhile."""
    from edgeact.runtime.demo import bundle_path, check_policy_bundle
    from edgeact.runtime.robot_config import load_robot_config
    from edgeact.runtime.sim_robot import sim_robot_config_dict

    store = BundleStore(tmp_path / "home" / "edgeact" / "bundles")
    a = store.flash(tiny(tmp_path / "a", 0))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = {**sim_robot_config_dict(), "instruction": "pick up the red block",
            "policy": {"type": "bundle", "path": "~/edgeact/bundles/current"}}
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(data))
    config = load_robot_config(path)
    assert bundle_path(config) == store.root / CURRENT              # `~` expanded, the link itself
    pinned = check_policy_bundle(config)
    assert Path(pinned.policy.path) == (store.root / a.id).resolve()
    store.flash(tiny(tmp_path / "b", 1))                            # switched after the run started
    assert read_manifest(bundle_path(pinned)).stages["decoder"].dim_ranges["seq"].max == 64    # still a's
    assert pinned.policy.bundle_dir(pinned.config_dir) == (store.root / a.id).resolve()


def test_edgeact_run_on_a_store_records_which_bundle_ran(tmp_path, tmp_path_factory):
    """End to end: a real bundle flashed into a store, `edgeact run` on a config naming STORE/current."""
    from edgeact.runtime.demo import demo_config_dict
    from tests.runtime.test_decode_program import exported_bundle

    exported = exported_bundle(tmp_path_factory, "D").bundle_dir
    store = BundleStore(tmp_path / "store")
    entry = store.flash(exported)
    data = demo_config_dict("bundle", "store/current", "simple", (0, ""))
    data["policy"]["path"] = "store/current"                        # relative: beside the config
    config = tmp_path / "robot.json"
    config.write_text(json.dumps(data))
    summary = tmp_path / "run.json"
    assert main(["run", str(config), "--seconds", "4", "--json", str(summary)]) == 0
    ran = json.loads(summary.read_text())
    assert ran["bundle"] == {"path": str((store.root / entry.id).resolve()),
                             "manifest_sha256": manifest_sha256(store.root / entry.id)}
    assert ran["bundle"]["manifest_sha256"].startswith(entry.id[-12:])
    assert ran["policy"]["plans"] > 0


def test_check_names_the_bundle_current_points_at(tmp_path):
    from edgeact.runtime.preflight import OK, preflight
    from edgeact.runtime.robot_config import load_robot_config
    from edgeact.runtime.sim_robot import sim_robot_config_dict

    store = BundleStore(tmp_path / "store")
    entry = store.flash(tiny(tmp_path / "b"))
    data = {**sim_robot_config_dict(), "instruction": "pick up the red block",
            "policy": {"type": "bundle", "path": "store/current"}}
    (tmp_path / "robot.json").write_text(json.dumps(data))
    row = next(c for c in preflight(load_robot_config(tmp_path / "robot.json"), frames=1, with_policy=False)
               if c.name == "bundle")
    assert row.status == OK and f"{store.root / CURRENT} -> {entry.id}: tiny-sim" in row.detail


# A real kill between the two renames that put a reinstalled entry in place (its old copy moved aside, the new one
# not yet renamed in): `current` names a folder that is not there until the next store operation puts it back.
_KILLED_REINSTALL = (KILL_AFTER_MOVING_ASIDE + "from edgeact.runtime import bundle_store\n"
                     "bundle_store.BundleStore(sys.argv[1]).flash(sys.argv[2])\n")


def test_a_reinstall_killed_midway_is_put_back_by_the_next_operation(tmp_path, capsys):
    src = tiny(tmp_path / "b")
    store = BundleStore(tmp_path / "store")
    entry = store.flash(src)
    (store.root / entry.id / "stages" / "decoder.onnx").write_bytes(b"damaged")        # so the next flash reinstalls
    proc = subprocess.run([sys.executable, "-c", _KILLED_REINSTALL, str(store.root), str(src)], cwd=Path.cwd(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert not (store.root / entry.id).exists()
    with pytest.raises(BundleError, match=r"current: a link to .*, which is missing; in a bundle store .*"
                                          r"`edgeact flash --list --store .*` shows what is installed \(and puts back"):
        load_bundle(store.root / CURRENT)

    assert main(["flash", "--list", "--store", str(store.root)]) == 0
    assert f"current -> {entry.id}: not an installed bundle here" in capsys.readouterr().out   # said, then mended
    assert store.link_entry(CURRENT) == entry.id and store.history()[-1]["action"] == "restore"
    assert [p.name for p in store.root.iterdir() if ".old-" in p.name or ".partial-" in p.name] == []
    with pytest.raises(BundleError, match="decoder.onnx: .* bytes but the manifest says"):
        load_bundle(store.root / CURRENT)            # the copy that was current, damaged as it was before the kill
    assert store.flash(src).copied                   # and the reinstall, done again, mends it
    load_bundle(store.root / CURRENT)


def test_the_summary_names_the_bundle_as_it_was_when_the_run_started(tmp_path):
    """A run's bundle may be removed (it is no longer current) or rebuilt while the run goes on."""
    from edgeact.runtime.telemetry import bundle_identity, run_summary

    store = BundleStore(tmp_path / "store")
    entry = store.flash(tiny(tmp_path / "a", 0))
    at_start = bundle_identity((store.root / CURRENT).resolve())
    digest = manifest_sha256(store.root / entry.id)
    store.flash(tiny(tmp_path / "b", 1))
    store.remove(entry.id)

    class Result:
        peak_rss_bytes, control_scheduling = {"control": 1 << 20}, "normal"

    summary = run_summary(Result(), at_start)
    assert summary["bundle"] == {"path": str(store.root / entry.id), "manifest_sha256": digest}
    assert summary["memory"]["bundle_mb"] == round(at_start["bytes"] / 2**20, 1) and at_start["bytes"] > 0


def test_storage_that_is_read_only_or_fills_up_is_said_plainly(tmp_path, monkeypatch, capsys):
    import errno

    store = BundleStore(tmp_path / "store")
    good = store.flash(tiny(tmp_path / "a", 0))
    src = tiny(tmp_path / "b", 1)

    def full(source: Path, dest: Path) -> str:
        raise OSError(errno.ENOSPC, "No space left on device", str(dest))

    monkeypatch.setattr(bundle_store, "_copy_file", full)
    assert main(["flash", str(src), "--store", str(store.root)]) == 2
    err = capsys.readouterr().err
    assert "the storage filled up" in err and "nothing was installed or switched" in err and "Traceback" not in err
    assert store.ids() == [good.id] and not [p for p in store.root.iterdir() if ".partial-" in p.name]
    monkeypatch.undo()

    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(bundle_store.LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(bundle_store.os, "open", read_only)
    with pytest.raises(ConfigError, match=r"on a read-only file system .*remounted it after storage errors \(check "
                                          r"dmesg\)"):
        store.rollback()


def test_links_that_name_no_installed_bundle(tmp_path, capsys):
    store = BundleStore(tmp_path / "store")
    a = store.flash(tiny(tmp_path / "a", 0))
    outside = tiny(tmp_path / "elsewhere", 1)
    os.remove(store.root / CURRENT)
    os.symlink(outside, store.root / CURRENT)       # how a robot was set up before it had a store
    b = store.flash(tiny(tmp_path / "b", 2))
    assert b.previous is None and store.link_target(PREVIOUS) is None      # not kept as "previous"
    store.use(a.id)
    import shutil
    shutil.rmtree(store.root / b.id)                # removed by hand: previous now names nothing
    assert store.dangling() == [f"{store.root / PREVIOUS} -> {b.id}: not an installed bundle here; --rollback has "
                                "nothing to go back to"]
    with pytest.raises(ConfigError, match=f"no previous bundle to roll back to \\({b.id} is not an installed"):
        store.rollback()
    c = store.flash(tiny(tmp_path / "c", 3))
    assert c.previous == a.id and store.link_entry(PREVIOUS) == a.id

    (store.root / CURRENT).unlink()
    (store.root / CURRENT).mkdir()                  # a folder where the link must be: refused before any copying
    with pytest.raises(BundleError, match="current: not a symlink"):
        store.flash(tiny(tmp_path / "d", 4))
    assert sorted(store.ids()) == sorted([a.id, c.id])


def test_odd_requests_are_refused_with_the_fix(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--store .*file: a file, not a folder"):
        BundleStore(tmp_path / "file")
    store = BundleStore(tmp_path / "store")
    store.flash(tiny(tmp_path / "a", 0))
    with pytest.raises(ConfigError, match="--keep 2 with --no-activate: keep at least 3"):
        store.flash(tiny(tmp_path / "b", 1), activate=False, keep=2)


def test_a_history_line_torn_by_a_power_cut_loses_nothing_after_it(tmp_path):
    store = BundleStore(tmp_path / "store")
    store.flash(tiny(tmp_path / "a", 0))
    with open(store.root / "history.jsonl", "a") as f:
        f.write('{"utc": "2026-')                   # no newline: the append was cut
    b = store.flash(tiny(tmp_path / "b", 1))
    assert [(r["action"], r["bundle"]) for r in store.history()][-2:] == [("install", b.id), ("switch", b.id)]
    assert store.entries()[-1].id == b.id and store.entries()[-1].source == str((tmp_path / "b").resolve())


def test_a_failed_engine_build_names_the_source_and_leaves_nothing(tmp_path, monkeypatch):
    from edgeact.export import engines
    from tests.export.test_engines import fake_tensorrt

    monkeypatch.setattr(engines, "device_compute_capability", lambda device=0: (8, 7))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt({}, parse_ok=False))
    store = BundleStore(tmp_path / "store")
    src = tiny(tmp_path / "b")
    with pytest.raises(BundleError) as err:
        store.flash(src, target="orin")
    assert str(src / "stages" / "decoder.onnx") in str(err.value) and ".partial-" not in str(err.value)
    assert "building the engines for orin failed, so nothing was installed or switched" in str(err.value)
    assert store.ids() == [] and [p.name for p in store.root.iterdir()] == [".lock"]


def test_an_empty_store_says_to_flash_first(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["flash", "--list", "--store", str(store)]) == 0
    out = " ".join(capsys.readouterr().out.split())          # the console wraps long lines
    assert f"nothing installed in {store} yet: `edgeact flash BUNDLE --store {store}`" in out
    with pytest.raises(BundleError, match=r"current: no bundle here; if .* is a bundle store, nothing is installed in it "
                                          r"yet: `edgeact flash BUNDLE --store "):
        load_bundle(store / CURRENT)
