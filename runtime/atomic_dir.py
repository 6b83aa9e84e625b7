"""Write a directory atomically: fill a hidden sibling, then rename it into place (checkpoints, bundles)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# The loader recognises interrupted writes by these names, and names the bundle an interrupted overwrite left aside.
from edgeact.runtime.bundle import OLD_INFIX, PARTIAL_INFIX, PREVIOUS_NAME


def occupied(out_dir: Path) -> bool:
    """Whether writing a new directory at `out_dir` would replace something: a file, or a folder with contents."""
    return out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))


def folder_holds(path: Path) -> str | None:
    """What the edgeact output at `path` is, read off its marker files: "a bundle", "a checkpoint", "a calibration
    set", "a demonstration set", "a depth tokenizer", "a bundle store"; "a file" for a file, "nothing" for a
    missing or empty folder; None for a folder of anything else."""
    import json

    if not path.exists():
        return "nothing"
    if not path.is_dir():
        return "a file"
    if not any(path.iterdir()):
        return "nothing"

    def read(name: str) -> dict:
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    manifest = read("manifest.json")
    if "stages" in manifest and "schema_version" in manifest:
        return "a bundle"
    kind = str(manifest.get("format", ""))
    if kind.startswith("edgeact-calibration"):
        return "a calibration set"
    if kind.startswith("edgeact-sim-demos"):
        return "a demonstration set"
    if "model_type" in read("config.json"):
        return "a checkpoint"
    if str(read("depth_tokenizer.json").get("format", "")).startswith("edgeact-depth"):
        return "a depth tokenizer"
    if (path / "history.jsonl").exists() or (path / "current").is_symlink():
        return "a bundle store"
    return None


def refuse_replacing(out: Path, own: str, option: str) -> None:
    """Refuse (ConfigError) an `--overwrite` that would replace anything but `own` (e.g. "a checkpoint") or nothing:
    another tool's output, an input of this run, a folder of someone's files."""
    from edgeact.runtime.errors import ConfigError

    held = folder_holds(out)
    if held in ("nothing", own):
        return
    what = held or "a folder that is not " + own
    raise ConfigError(f"{option} {out} holds {what}: --overwrite replaces only {own}; choose another {option}, or "
                      "remove that one yourself if you really mean to replace it")


def partial_dir(out_dir: Path) -> Path:
    """A new empty hidden sibling of `out_dir` on the same file system (so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{PARTIAL_INFIX}", dir=out_dir.parent))


def set_usual_permissions(root: Path) -> None:
    """mkdtemp (and some libraries' temporary files) make owner-only entries; give the umask's usual modes,
    so a checkpoint or bundle copied onto a robot is readable by the service user that runs it."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory below `root`, so a power cut after publishing loses nothing."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            fsync_path(path)


def publish_new(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` onto `out_dir`, which must be missing or an empty folder: unlike `publish`, what
    appeared at `out_dir` meanwhile (another run's set, a user's files) is never replaced (FileExistsError)."""
    set_usual_permissions(tmp)
    try:
        out_dir.rmdir()             # an empty folder only; a file or a folder with contents raises
    except FileNotFoundError:
        pass
    except OSError:
        raise FileExistsError(f"{out_dir} was filled while this was written") from None
    try:
        os.rename(tmp, out_dir)     # onto a folder that appeared with contents meanwhile: ENOTEMPTY
    except OSError:
        raise FileExistsError(f"{out_dir} appeared while this was written") from None
    fsync_path(out_dir.parent)


def publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` onto `out_dir`. An existing `out_dir` is moved aside first (to
    `.NAME.old-XXXX/previous`) and removed only after the rename succeeded; if the rename fails it is put
    back. A kill between the two renames leaves no `out_dir`: the loader then names the previous bundle
    and the move that restores it (runtime/bundle.py previous_bundles)."""
    set_usual_permissions(tmp)
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{OLD_INFIX}", dir=out_dir.parent))
        os.rename(out_dir, old / PREVIOUS_NAME)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(old / PREVIOUS_NAME, out_dir)
            raise
        shutil.rmtree(old)
    else:
        # rename() onto a directory that appeared meanwhile fails (ENOTEMPTY) rather than mixing two writes.
        os.rename(tmp, out_dir)
    fsync_path(out_dir.parent)
