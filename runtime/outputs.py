"""Where `sdc run` writes: `--out` is a .png file (batch: name-1.png, name-2.png, ...) or a folder
(`<seed>.png` inside, never overwriting an existing file).

`check_out` refuses an --out that cannot be written before any work, and creates nothing (a
refused run leaves no folder behind). `save_images` writes a batch image by image, each
atomically (runtime/png.py); when one fails (disk full, a folder gone read-only) or the user
interrupts, no temporary file is left and the error names exactly the images that were written
and the seeds of those that were not.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

from ..errors import SdcError
from .png import _FLAGS, _temp_name, fsync_dir, png_bytes, signals_deferred, write_atomic


class OutputError(SdcError):
    """An image could not be written; the message says which were."""


class SaveInterrupted(SdcError):
    """Ctrl-C / SIGTERM while saving; the message says which images were written."""

    exit_code = 130  # 128 + SIGINT, as for an interrupt anywhere else


def output_paths(out: Path, seeds: list[int]) -> list[Path]:
    """The file each image goes to. Names only: nothing is created here."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        folder = out.parent
        paths = [out] if len(seeds) == 1 else \
            [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(len(seeds))]
    elif out.suffix:
        raise SdcError(f"--out {out}: expected a .png file or a folder")
    else:
        folder = out
        paths, taken = [], set()
        for seed in seeds:
            p, n = folder / f"{seed}.png", 1
            # lexists: a (dangling) symlink is an existing entry too, and is never replaced
            while os.path.lexists(p) or p in taken:
                p, n = folder / f"{seed}-{n}.png", n + 1
            paths.append(p)
            taken.add(p)
    if folder.exists() and not folder.is_dir():
        raise SdcError(f"--out {out}: {folder} is a file, expected a folder")
    return paths


def check_out(out: Path, count: int) -> None:
    """Refuse, before minutes of work, an --out the images could not be written to: a folder
    that is a file, a file name that is a folder, a place this process cannot create files in
    (tested by creating one: os.access says yes to root on a read-only mount)."""
    out = Path(out)
    paths = output_paths(out, list(range(max(1, count))))  # a bad count is the pipeline's to refuse
    for p in paths:
        if p.is_dir():
            raise SdcError(f"--out {out}: {p} is a folder, expected a .png file name; give "
                           "another --out")
    folder = paths[0].parent
    probe = folder
    while not probe.exists() and probe != probe.parent:  # the folder is created when saving
        probe = probe.parent
    if not probe.is_dir():
        raise SdcError(f"--out {out}: cannot create {folder}: {probe} is a file, expected a folder")
    name = _temp_name(probe / ".sdc-write-check")
    try:
        with signals_deferred():  # an interrupt here must not leave the probe behind
            os.close(os.open(name, _FLAGS, 0o600))
            os.unlink(name)
    except OSError as e:
        raise SdcError(f"--out {out}: cannot write in {probe} ({e.strerror or e}); give an --out "
                       "this user can write to") from None


def save_images(images, paths: list[Path], texts: list[str], *, seeds: list[int] | None = None,
                cancel=None, on_written: Callable[[Path], None] | None = None) -> list[Path]:
    """Write image i to paths[i] with texts[i] as its `parameters` chunk, in order, each
    atomically. `cancel` (a threading.Event) set counts as an interrupt: the CLI's signal handler
    sets it when the KeyboardInterrupt itself was swallowed (runtime/../cli/main.py). Raises
    OutputError / SaveInterrupted naming what was written; returns the written paths."""
    paths = [Path(p) for p in paths]
    written: list[Path] = []
    created: list[Path] = []  # folders this call made, removed again if nothing is written
    current = None
    try:
        for folder in dict.fromkeys(p.parent for p in paths):
            current = folder
            missing = [folder, *folder.parents]
            missing = missing[:next(i for i, f in enumerate(missing) if f.exists())]
            folder.mkdir(parents=True, exist_ok=True)
            created += missing
        for img, path, text in zip(images, paths, texts):
            current = path
            data = png_bytes(img, text)
            if cancel is not None and cancel.is_set():
                raise KeyboardInterrupt
            write_atomic(path, data, written.append)
            if on_written is not None:
                on_written(path)
        for folder in dict.fromkeys(p.parent for p in paths):
            fsync_dir(folder)
    except BaseException as e:
        if not written:  # leave no trace: the folders made for this batch go again
            for folder in created:  # deepest first; only while empty
                try:
                    folder.rmdir()
                except OSError:
                    break
        _raise_named(e, written, paths, seeds, current)
        raise
    return written


def _raise_named(e: BaseException, written, paths, seeds, current) -> None:
    """Re-raise a save failure as the one-line error naming what was written."""
    if isinstance(e, KeyboardInterrupt):
        raise SaveInterrupted(f"interrupted while saving; {_summary(written, paths, seeds)}") \
            from None
    if isinstance(e, OSError):
        what = (f"image {len(written) + 1} of {len(paths)} to {current}" if current in paths
                else f"the folder {current}")
        advice = ("free some disk space or give another --out" if e.errno == errno.ENOSPC else
                  "give an --out this user can write to")
        raise OutputError(f"cannot write {what} ({e.strerror or e}); "
                          f"{_summary(written, paths, seeds)}; {advice}") from None


def _summary(written: list[Path], paths: list[Path], seeds: list[int] | None) -> str:
    n, k = len(paths), len(written)
    if k == 0:
        text = f"none of the {n} image(s) was written"
    else:
        text = f"wrote {k} of {n} image(s): " + ", ".join(map(str, written))
    if seeds and k < n:
        rest = seeds[k:]
        consecutive = rest == list(range(rest[0], rest[0] + len(rest)))
        text += (f"; not written: seed(s) {rest[0]} to {rest[-1]} (--seed {rest[0]} --batch "
                 f"{len(rest)})" if consecutive and len(rest) > 1 else
                 f"; not written: seed(s) {', '.join(map(str, rest))}")
    return text
