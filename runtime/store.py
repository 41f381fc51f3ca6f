"""The artifact store: the one place that decides which paths of a build directory may be touched and
how a build is written, for `sdc build`, `sdc build --from`, `sdc verify` and `sdc run` alike.

A build directory is untrusted input (builds travel to edge boxes and get shared), so:
- **containment**: a path a manifest names is accepted only when it is relative, has no `.`/`..`
  parts, and resolves (symlinks followed) inside the build directory;
- **transaction**: a build is written into a private temporary directory beside its output
  (created exclusively, mode 0700, so nothing planted can be followed), the manifest last, and then
  swapped onto the output in one atomic `renameat2(RENAME_EXCHANGE)` where the kernel has it (a
  signal can never fall between "old moved away" and "new moved in"); elsewhere the two renames
  run with SIGINT/SIGTERM blocked, and a backup left by a killed process is restored, not deleted;
- **ownership**: sdc replaces only files it wrote. A directory holding anything its manifest does
  not list (a user's `outputs/` folder, notes) is refused before any work, naming what is there.

Torch-free: the runtime and the build side both use it; nothing here imports onnx or torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import signal
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..errors import SdcError

MANIFEST = "manifest.json"
TMP_PREFIX = ".sdc-tmp-"  # <TMP_PREFIX><pid>-<kind>-<name>.<random>
STAGING, BACKUP = "new", "old"


def sha256_file(path: Path, chunk: int = 4 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, path: Path) -> tuple[str, dict]:
    return path.relative_to(root).as_posix(), {"sha256": sha256_file(path),
                                               "bytes": path.stat().st_size}


# --- containment ---------------------------------------------------------------------------------

def check_relative(rel, what: str, where: Path) -> str:
    """`rel` as a safe relative POSIX path string; SdcError naming `what` otherwise."""
    bad = None
    if not isinstance(rel, str) or not rel:
        bad = "not a non-empty string"
    elif "\\" in rel or "\x00" in rel or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        bad = "an absolute path or one with a backslash/NUL"
    elif any(part in ("", ".", "..") for part in rel.split("/")):
        bad = "a path with an empty, '.' or '..' part"
    if bad:
        raise SdcError(f"{where}: {what} names {rel!r}, {bad}; a build may only name files inside "
                       "itself — refusing it (rebuild it, or get it from a trusted source)")
    return rel


def contained(root: Path, rel, what: str) -> Path:
    """root/rel, refused unless rel is a safe relative path that resolves inside root."""
    check_relative(rel, what, root)
    base = Path(root).resolve()
    target = (base / PurePosixPath(rel)).resolve()
    if target != base and base not in target.parents:
        raise SdcError(f"{root}: {what} {rel!r} resolves to {target}, outside the build directory "
                       "(a symlink out); refusing it — rebuild it, or get it from a trusted source")
    return target


def read_json_object(path: Path, limit: int = 16 * 2**20) -> dict:
    """A JSON object from a build (scheduler or tokenizer config): one-line SdcError when it is
    too big, not JSON, too deeply nested or not an object."""
    import json

    try:
        if path.stat().st_size > limit:
            raise ValueError(f"{path.stat().st_size} bytes, over {limit // 2**20} MiB")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SdcError(f"{path}: not a readable JSON file ({str(e)[:80]}); rebuild the artifacts") from None
    if not isinstance(data, dict):
        raise SdcError(f"{path}: holds a JSON {type(data).__name__}, expected an object; rebuild "
                       "the artifacts")
    return data


# --- ownership -----------------------------------------------------------------------------------

def foreign_files(folder: Path, listed) -> list[str]:
    """Files and folders under `folder` that sdc did not write (not in `listed`, not the manifest),
    as relative paths, sorted. Symlinks count as foreign (sdc writes none)."""
    keep = set(listed) | {MANIFEST}
    keep_dirs = {str(PurePosixPath(r).parent) for r in keep}
    keep_dirs |= {str(p) for r in keep_dirs for p in PurePosixPath(r).parents}
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder).as_posix()
        for name in list(dirnames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if os.path.islink(os.path.join(dirpath, name)) or rel not in keep_dirs:
                out.append(rel + "/")
                dirnames.remove(name)  # report the folder once, not its contents
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel not in keep or os.path.islink(os.path.join(dirpath, name)):
                out.append(rel)
    return sorted(out)


def refuse_foreign(out: Path, listed) -> None:
    found = foreign_files(out, listed)
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise SdcError(f"--out {out} holds files sdc did not write ({shown}); a rebuild replaces the "
                       "whole directory, so move them out first or choose another --out")


# --- the transaction ------------------------------------------------------------------------------

def _tmp_name(kind: str, out: Path) -> str:
    return f"{TMP_PREFIX}{os.getpid()}-{kind}-{out.name}."


def _owner_pid(d: Path) -> int | None:
    try:
        return int(d.name[len(TMP_PREFIX):].split("-", 1)[0])
    except ValueError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(out: Path) -> None:
    """Clean what killed sdc processes left beside `out`: staging directories are removed; a
    backup of a previous build is moved back when `out` is missing (the process died between the
    two renames of a non-atomic swap), removed otherwise."""
    for d in sorted(out.parent.glob(f"{TMP_PREFIX}*")):
        pid = _owner_pid(d)
        if pid is None or _alive(pid) or not d.is_dir() or d.is_symlink():
            continue
        kind = d.name[len(TMP_PREFIX):].split("-", 1)[-1]
        if kind.startswith(f"{BACKUP}-{out.name}.") and (d / "build").is_dir() and not out.exists():
            os.rename(d / "build", out)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A private, freshly created directory beside `out` to build into; removed on the way out
    (after a successful `commit` it is gone already)."""
    recover_stale(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(STAGING, out), dir=out.parent))
    except OSError as e:
        raise SdcError(f"--out {out}: cannot create a temporary directory in {out.parent} "
                       f"({e.strerror}); choose a writable location") from None
    try:
        yield tmp
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # disk full: one line, nothing left behind
            raise SdcError(f"--out {out}: the disk holding {out.parent} is full ({e.strerror}); "
                           "nothing was written and the temporary files are removed — free space "
                           "or choose another --out") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _renameat2_exchange():
    """libc's renameat2 with RENAME_EXCHANGE, or None where the C library lacks it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def exchange(a: Path, b: Path) -> bool:
        at_fdcwd, rename_exchange = -100, 2
        if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return True
        if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            return False  # kernel or filesystem without it: the fallback swap
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))

    return exchange


_EXCHANGE = _renameat2_exchange()


@contextlib.contextmanager
def _signals_blocked():
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):  # not the main thread / no sigmask: best effort
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def commit(tmp: Path, out: Path, listed_before=None) -> None:
    """Put the finished build `tmp` at `out`. An existing build at `out` is replaced only when it
    holds nothing sdc did not write (`listed_before`: its manifest's files); it is deleted only
    after the new one is in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    refuse_foreign(out, listed_before or ())
    if _EXCHANGE is not None and _EXCHANGE(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous build
        return
    backup = Path(tempfile.mkdtemp(prefix=_tmp_name(BACKUP, out), dir=out.parent))
    with _signals_blocked():
        os.rename(out, backup / "build")
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(backup / "build", out)
            raise
    shutil.rmtree(backup, ignore_errors=True)
