"""The robot's bundle store: bundles installed side by side, one of them current, switched in one rename.

`edgeact flash BUNDLE` is the last step of the toolchain (DESIGN: bundle -> flash onto a device: verify checksums,
build engines, install -> runtime). A robot config names `STORE/current`; flashing a new bundle never touches the
one that runs until the new one is whole, checked and (with a target) has its engines, and `--rollback` goes back
in one step. Layout of a store (default ~/edgeact/bundles):

    NAME-0123456789ab/       an installed bundle: the source's name and the first 12 hex digits of its manifest's
                             sha256 (the same bundle flashed twice is one entry)
    current -> NAME-...      what robot configs load (policy.path: ~/edgeact/bundles/current)
    previous -> NAME-...     what was current before; `edgeact flash --rollback` swaps the two
    history.jsonl            one line per install, switch and removal: when, who, what, from where
    .lock                    held by the one store operation at a time
    .NAME-....partial-XXXX   an install in progress (hidden; never loaded; removed by the next operation)

Every write is crash-safe: a bundle is copied into a hidden sibling, flushed, read back from the storage and
checked against the manifest's sha256 (an SD card or eMMC that returns other bytes is caught here, not at the first
plan), then renamed into place; `current` and `previous` are symlinks replaced by rename, so a power cut leaves
either the old link or the new one, never none.
"""
from __future__ import annotations

import errno
import fcntl
import getpass
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeact.runtime.atomic_dir import fsync_path, partial_dir, publish
from edgeact.runtime.bundle import (
    ALLOW_UNVERIFIED_FLAG, MANIFEST_NAME, OLD_INFIX, PARTIAL_INFIX, PREVIOUS_NAME, Bundle, Manifest,
    check_graphs, check_verification, manifest_sha256, read_manifest, verify_files,
)
from edgeact.runtime.errors import BundleError, ConfigError, EdgeactError

DEFAULT_STORE = "~/edgeact/bundles"
CURRENT, PREVIOUS = "current", "previous"
HISTORY_NAME = "history.jsonl"
LOCK_NAME = ".lock"
REMOVING_INFIX = ".removing-"
ID_DIGITS = 12
_ID_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{{{ID_DIGITS}}}")
_CHUNK_BYTES = 1 << 20
# Room kept free beyond the bundle: logs, recordings and the OS live on the same storage on most robots.
SPACE_MARGIN_BYTES = 256 << 20
FLASH_UNVERIFIED_FIX = f"to install it anyway, pass {ALLOW_UNVERIFIED_FLAG} to edgeact flash"


@dataclass(frozen=True)
class StoreEntry:
    """One installed bundle, as `edgeact flash --list` shows it."""

    id: str
    path: Path
    manifest: Manifest | None           # None: its manifest is unreadable (error says why)
    error: str | None
    bytes: int
    installed_utc: str | None
    source: str | None
    current: bool
    previous: bool


@dataclass(frozen=True)
class FlashResult:
    id: str
    path: Path
    copied: bool                        # False: the same bundle was installed and whole already
    engines_built: tuple[str, ...]      # stages whose TensorRT engines were built for the target
    activated: bool
    previous: str | None                # what `current` pointed at before (None: nothing, or unchanged)
    removed: tuple[str, ...]            # entries removed to keep `keep`


def store_path(store: str | Path | None) -> Path:
    return Path(store if store is not None else DEFAULT_STORE).expanduser()


def entry_id(source: str | Path, manifest_digest: str) -> str:
    """NAME-0123456789ab: the source folder's name (a trailing id of a store entry dropped) and the digest."""
    name = Path(source).resolve().name
    name = re.sub(rf"-[0-9a-f]{{{ID_DIGITS}}}$", "", name)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "bundle"
    return f"{name}-{manifest_digest[:ID_DIGITS]}"


class BundleStore:
    def __init__(self, root: str | Path | None = None):
        self.root = store_path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--store {self.root}: a file, not a folder; the store is a folder (made if missing): "
                              f"give another path, or move the file away")
        from edgeact.runtime.atomic_dir import folder_holds

        held = folder_holds(self.root)
        if held not in (None, "nothing", "a bundle store"):     # a store is made inside no edgeact output
            raise ConfigError(f"--store {self.root} holds {held}, not a bundle store; give the store its own folder "
                              f"(default {DEFAULT_STORE})")
        for parent in self.root.parents:    # nor below one: replacing that output would take the store with it
            try:
                above = folder_holds(parent)
            except OSError:                 # a folder it may pass through but not list: no edgeact output
                continue
            if above in ("a bundle", "a checkpoint"):
                raise ConfigError(f"--store {self.root} lies inside {parent}, which holds {above}: re-exporting it "
                                  f"would delete the store; give the store its own folder (default {DEFAULT_STORE})")

    # -- reading ------------------------------------------------------------------------------------

    def link_target(self, link: str) -> str | None:
        """What `current` or `previous` points at: an entry's id as the link names it (None: no such link). The
        entry may be missing (`link_entry` says whether it is there)."""
        path = self.root / link
        if not path.is_symlink():
            if path.exists():
                raise BundleError(f"{path}: not a symlink; the store's {link!r} must be one (made by edgeact flash); "
                                  f"move it away and flash again")
            return None
        return os.readlink(path)

    def link_entry(self, link: str) -> str | None:
        """The installed entry `current` or `previous` points at; None when there is no link, or it points at no
        entry of this store (removed by hand, or a folder elsewhere linked before the store was used)."""
        target = self.link_target(link)
        if target is None or "/" in target or not _ID_RE.fullmatch(target) or not (self.root / target).is_dir():
            return None
        return target

    def dangling(self) -> list[str]:
        """Lines about links that point at no installed entry, each with the fix."""
        out = []
        for link in (CURRENT, PREVIOUS):
            target = self.link_target(link)
            if target is not None and self.link_entry(link) is None:
                fix = ("robot configs that load it do not start; make an installed bundle current: edgeact flash "
                       "--use ID (or flash one)" if link == CURRENT else "--rollback has nothing to go back to")
                out.append(f"{self.root / link} -> {target}: not an installed bundle here; {fix}")
        return out

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.is_symlink() and _ID_RE.fullmatch(p.name))

    def entries(self) -> list[StoreEntry]:
        current, previous = self.link_entry(CURRENT), self.link_entry(PREVIOUS)
        installs = self._last_installs()
        order = {id_: i for i, id_ in enumerate(installs)}      # oldest install first (the log's order)
        out = []
        for id_ in self.ids():
            path = self.root / id_
            try:
                manifest, error = read_manifest(path), None
            except BundleError as exc:
                manifest, error = None, str(exc)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            record = installs.get(id_, {})
            installed = record.get("utc") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))
            out.append(StoreEntry(id_, path, manifest, error, size, installed, record.get("source"),
                                  id_ == current, id_ == previous))
        return sorted(out, key=lambda e: (e.installed_utc or "", order.get(e.id, -1), e.id))

    def history(self) -> list[dict[str, Any]]:
        path = self.root / HISTORY_NAME
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:    # a line cut by a power cut: the others still count
                continue
        return records

    def _last_installs(self) -> dict[str, dict[str, Any]]:
        """Each entry's last install record, ordered by when it was made."""
        last: dict[str, dict[str, Any]] = {}
        for r in self.history():
            if r.get("action") == "install" and "bundle" in r:
                last.pop(r["bundle"], None)
                last[r["bundle"]] = r
        return last

    def resolve(self, id_or_prefix: str) -> str:
        """An entry's id from its id, a unique prefix of it, or `current` / `previous`."""
        if id_or_prefix in (CURRENT, PREVIOUS):
            target = self.link_entry(id_or_prefix)
            if target is None:
                raise ConfigError(f"{self.root}: no {id_or_prefix} bundle; `edgeact flash --list --store "
                                  f"{self.root}` shows what is installed")
            return target
        ids = self.ids()
        matches = [i for i in ids if i == id_or_prefix] or [i for i in ids if i.startswith(id_or_prefix)]
        if len(matches) != 1:
            what = "matches several" if matches else "is not installed"
            raise ConfigError(f"{id_or_prefix!r} {what} in {self.root}; installed: {', '.join(ids) or 'nothing'}")
        return matches[0]

    # -- writing ------------------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One store operation at a time (two flashes at once must not switch `current` under each other); clears
        what killed operations left (hidden partial copies, half-removed entries)."""
        with storage_errors(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ConfigError(f"{self.root}: another edgeact flash is working on this store; wait for it to "
                                  "finish") from None
            with storage_errors(self.root):
                self.link_target(CURRENT)       # a folder where a link must be: refused before any work
                self.link_target(PREVIOUS)
                self._clear_leftovers()
                yield
        finally:
            os.close(fd)

    def recover(self) -> None:
        """What `locked` does on entering: finish or undo what a killed operation left (nothing else)."""
        with self.locked():
            pass

    def _clear_leftovers(self) -> None:
        """Undo or finish what killed operations left: an entry a reinstall moved aside (`.ID.old-X/previous`, by
        atomic_dir.publish) goes back where `current` may name it if the new copy never took its place, else is
        deleted; copies in progress and half-removed entries are deleted; stray new links are unlinked."""
        for path in sorted(self.root.iterdir()):
            name = path.name
            if name.startswith(".") and OLD_INFIX in name and path.is_dir() and not path.is_symlink():
                id_ = name[1:].split(OLD_INFIX)[0]
                if _ID_RE.fullmatch(id_):
                    aside = path / PREVIOUS_NAME
                    if aside.is_dir() and not (self.root / id_).exists():
                        os.rename(aside, self.root / id_)
                        fsync_path(self.root)
                        self._log("restore", bundle=id_)
                    shutil.rmtree(path, ignore_errors=True)
        for path in self.root.iterdir():
            name = path.name
            if path.is_symlink() and re.fullmatch(rf"\.({CURRENT}|{PREVIOUS})\.new-\d+", name):
                path.unlink()           # a link a killed switch made and did not rename into place
                continue
            if name.startswith(".") and path.is_dir() and (PARTIAL_INFIX in name or REMOVING_INFIX in name) \
                    and _ID_RE.fullmatch(name[1:].split(PARTIAL_INFIX)[0].split(REMOVING_INFIX)[0]):
                shutil.rmtree(path, ignore_errors=True)

    def _log(self, action: str, **fields: Any) -> None:
        record = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": action, **fields,
                  "user": _user(), "host": socket.gethostname()}
        path = self.root / HISTORY_NAME
        torn = path.is_file() and path.stat().st_size > 0 and not _ends_with_newline(path)
        with open(path, "a") as f:
            f.write(("\n" if torn else "") + json.dumps(record) + "\n")     # after a line a power cut tore
            f.flush()
            os.fsync(f.fileno())

    def _set_link(self, link: str, target: str | None) -> None:
        """Point `link` at entry `target` (relative, so the store can move), or remove it; atomic by rename."""
        path = self.root / link
        if target is None:
            if path.is_symlink():
                path.unlink()
        else:
            tmp = self.root / f".{link}.new-{os.getpid()}"
            if tmp.is_symlink():
                tmp.unlink()
            os.symlink(target, tmp)
            os.replace(tmp, path)
        fsync_path(self.root)

    def _activate(self, id_: str, action: str) -> str | None:
        """`current` -> id_, `previous` -> what current was (if another); returns that."""
        check_whole(self.root / id_, checksums=False)
        before = self.link_entry(CURRENT)       # a link to no installed entry is replaced, not kept as previous
        if before == id_:
            return None
        # previous first: a power cut between the two leaves current as it was, with previous == current.
        if before is not None:
            self._set_link(PREVIOUS, before)
        self._set_link(CURRENT, id_)
        self._log(action, bundle=id_, previous=before)
        return before

    def use(self, id_or_prefix: str) -> tuple[str, str | None]:
        """Make an installed bundle current; returns (its id, the one it replaced)."""
        with self.locked():
            id_ = self.resolve(id_or_prefix)
            return id_, self._activate(id_, "switch")

    def rollback(self) -> tuple[str, str]:
        """Swap `current` and `previous`; returns (the new current, the new previous)."""
        with self.locked():
            previous, current = self.link_target(PREVIOUS), self.link_entry(CURRENT)
            if previous is not None and previous == current:   # a switch cut short between its two links
                raise ConfigError(f"{self.root}: previous and current are both {current}; nothing to roll back to; "
                                  f"`edgeact flash --use ID --store {self.root}` makes any installed one current")
            if previous is None or self.link_entry(PREVIOUS) is None:
                raise ConfigError(f"{self.root}: no previous bundle to roll back to"
                                  + (f" ({previous} is not an installed bundle here)" if previous else "")
                                  + f"; `edgeact flash --use ID --store {self.root}` makes any installed one current")
            self._activate(previous, "rollback")
            return previous, current

    def remove(self, id_or_prefix: str) -> str:
        with self.locked():
            id_ = self.resolve(id_or_prefix)
            if id_ == self.link_entry(CURRENT):
                raise ConfigError(f"{id_} is the current bundle (what robot configs load); make another current first "
                                  f"(edgeact flash --rollback, or --use ID), then remove it")
            self._remove(id_, "remove")
            return id_

    def _remove(self, id_: str, action: str) -> None:
        # Out of sight in one rename, then deleted: a kill midway leaves a hidden folder the next operation clears.
        doomed = Path(tempfile.mkdtemp(prefix=f".{id_}{REMOVING_INFIX}", dir=self.root))
        os.rename(self.root / id_, doomed / id_)
        if self.link_entry(PREVIOUS) == id_ or self.link_target(PREVIOUS) == id_:
            self._set_link(PREVIOUS, None)
        fsync_path(self.root)
        self._log(action, bundle=id_)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self, keep: int, spare: set[str]) -> list[str]:
        """Remove the oldest entries beyond `keep`, never `current`, `previous` or those in `spare`."""
        entries = self.entries()
        protected = {self.link_entry(CURRENT), self.link_entry(PREVIOUS), *spare}
        removable = [e.id for e in entries if e.id not in protected]
        excess = len(entries) - keep
        removed = removable[:max(0, excess)]
        for id_ in removed:
            self._remove(id_, "prune")
        return removed

    def flash(self, source: str | Path, *, target: str | None = None, activate: bool = True, keep: int | None = None,
              allow_unverified: bool = False, workspace_gb: float = 4.0,
              on_step: Callable[[str], None] | None = None) -> FlashResult:
        """Install the bundle at `source`: check it, copy it in (checked as read and read back), build its TensorRT
        engines for `target`, then make it current (`activate`) and keep at most `keep` entries."""
        say = on_step or (lambda text: None)
        if keep is not None and keep < (2 if activate else 3):
            raise ConfigError(f"--keep {keep}: keep at least 2 (the current bundle and the previous, for --rollback)"
                              if activate else f"--keep {keep} with --no-activate: keep at least 3 (the current "
                              "bundle, the previous, and the one installed)")
        source = Path(source).expanduser()
        manifest_digest = manifest_sha256(source) if (source / MANIFEST_NAME).is_file() else None
        manifest = read_manifest(source)
        if manifest_digest is None or manifest_sha256(source) != manifest_digest:
            raise BundleError(f"{source / MANIFEST_NAME} changed while it was read (an `edgeact verify` or "
                              "`build-engines` writing it?); flash it again once that has ended; nothing was "
                              "installed or switched")
        check_verification(manifest, source, allow_unverified, FLASH_UNVERIFIED_FIX)
        # Sizes now; the sha256 while copying, the graphs on the copy (so the bytes checked are the bytes installed,
        # as plain files: a source's links are read through)
        verify_files(source, manifest, checksums=False, graphs=False, links=True)
        build = None
        if target is not None:
            from edgeact.export.engines import check_buildable     # TensorRT: only where engines are built

            build = check_buildable(Bundle(source, manifest), target, workspace_gb=workspace_gb)   # before copying
        id_ = entry_id(source, manifest_digest)
        with self.locked():
            dest = self.root / id_
            copied, built = False, ()
            if not self._installed_whole(dest, build, say):
                needed = _bundle_bytes(manifest) + (sum(manifest.files[s.file].bytes for s in build[1]) if build else 0)
                check_space(self.root, needed, id_)
                say(f"copying {source} into {dest} ({_mib(_bundle_bytes(manifest))}), checking every file's sha256")
                tmp = partial_dir(dest)
                try:
                    copy_checked(source, tmp, manifest, manifest_digest)
                    if build is not None:
                        built = _build(tmp, source, target, build, workspace_gb, allow_unverified, say)
                    publish(tmp, dest)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                copied = True
                self._log("install", bundle=id_, source=str(source.resolve()), target=target,
                          engines=list(built))
            previous = self._activate(id_, "switch") if activate else None
            removed = self._prune(keep, {id_}) if keep is not None else []
        return FlashResult(id_, dest, copied, tuple(built), activate, previous, tuple(removed))

    def _installed_whole(self, dest: Path, build, say: Callable[[str], None]) -> bool:
        """Whether `dest` holds this bundle whole already (and the target's engines, if asked for)."""
        if not dest.is_dir():
            return False
        try:
            installed = check_whole(dest, checksums=True)
        except BundleError as exc:
            say(f"{dest.name} is installed but damaged ({exc}); installing it again")
            return False
        if build is not None:
            tgt, chosen = build[0], build[1]
            engines = installed.engines_for(tgt.name)
            if any(stage.name not in engines for stage in chosen):
                say(f"{dest.name} is installed without engines for {tgt.name}; installing it again with them")
                return False
        say(f"{dest.name} is installed already and whole (sha256 checked); not copied again")
        return True


def _build(tmp: Path, source: Path, target: str, build, workspace_gb: float, allow_unverified: bool,
           say: Callable[[str], None]) -> tuple[str, ...]:
    from edgeact.export.engines import build_engines

    def on_stage(name: str, index: int, total: int) -> None:
        say(f"building {name} for {target} ({index + 1}/{total}); TensorRT takes minutes per stage ...")

    try:
        records = build_engines(tmp, target, workspace_gb=workspace_gb, allow_unverified=allow_unverified,
                                stages=[s.name for s in build[1]], on_stage=on_stage)
    except EdgeactError as exc:     # its paths are in the copy, which is deleted: name the source's files
        raise type(exc)(f"{str(exc).replace(str(tmp), str(source))}; building the engines for {target} failed, "
                        "so nothing was installed or switched") from None
    return tuple(r.stage for r in records)


@contextmanager
def storage_errors(root: Path) -> Iterator[None]:
    """The storage's own failures as errors that say what to do (a robot's SD card or eMMC: ext4 remounts itself
    read-only after I/O errors; recordings fill it)."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise ConfigError(f"{root}: on a read-only file system ({exc.filename}); if it was writable before, "
                              "the kernel may have remounted it after storage errors (check dmesg); remount it "
                              "read-write, or give another --store") from None
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConfigError(f"{root}: the storage filled up ({exc.filename}); nothing was installed or switched; "
                              "free space (old recordings, logs) or remove old bundles (edgeact flash --list, "
                              "--remove ID)") from None
        raise


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def check_whole(bundle_dir: Path, checksums: bool) -> Manifest:
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest, checksums=checksums)
    return manifest


def _bundle_bytes(manifest: Manifest) -> int:
    return sum(f.bytes for f in manifest.files.values())


def check_space(root: Path, needed: int, id_: str) -> None:
    free = shutil.disk_usage(root).free
    if free < needed + SPACE_MARGIN_BYTES:
        raise ConfigError(f"{root}: {_mib(free)} free, and installing {id_} needs {_mib(needed)} plus "
                          f"{_mib(SPACE_MARGIN_BYTES)} kept free; remove old bundles (edgeact flash --list, then "
                          f"--remove ID, or flash with --keep N) or free space on that storage")


def copy_checked(source: Path, dest: Path, manifest: Manifest, manifest_digest: str | None = None) -> None:
    """Copy the manifest and every file it lists (nothing else: no caches the source grew) from `source` into the
    empty folder `dest`, hashing what is read against the manifest (and the manifest against `manifest_digest`, the
    one that was checked, where given); then flush, drop the written pages from the page cache and read everything
    back from the storage, checking each sha256 again."""
    for rel, entry in sorted(manifest.files.items()):
        digest = _copy_file(source / rel, dest / rel)
        if digest != entry.sha256:
            raise BundleError(f"{source / rel}: sha256 mismatch in the source bundle (file corrupt or modified); "
                              f"re-copy or re-export it; nothing was installed")
    if _copy_file(source / MANIFEST_NAME, dest / MANIFEST_NAME) != (manifest_digest or manifest_sha256(source)):
        raise BundleError(f"{source / MANIFEST_NAME} changed while the bundle was copied (an `edgeact verify` or "
                          "`build-engines` writing it?); flash it again once that has ended; nothing was installed "
                          "or switched")
    for path in [dest, *dest.rglob("*")]:       # the files are flushed as written; their folders' entries here
        if path.is_dir():
            fsync_path(path)
    try:        # the bundle's own fault, not the storage's: named as the source's files, whose copies are dropped
        check_graphs(dest, manifest, where=source)
    except BundleError as exc:
        raise BundleError(f"{exc}; nothing was installed or switched") from None
    try:
        verify_files(dest, read_manifest(dest), checksums=True)
    except BundleError as exc:
        raise BundleError(f"{dest}: the copy does not read back as written ({exc}); the storage may be failing "
                          f"(check dmesg) or full; nothing was installed or switched") from None


def _copy_file(src: Path, dst: Path) -> str:
    digest = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK_BYTES):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
        if hasattr(os, "posix_fadvise"):        # the read-back then comes from the storage, not from memory
            os.posix_fadvise(fout.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return digest.hexdigest()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):     # a container's uid without a passwd entry
        return str(os.getuid())
