"""Where `sdc run` writes: `--out` is a .png file (batch: name-1.png, name-2.png, ...) or a folder
(`<seed>.png` inside, never overwriting an existing file). Checked before generating."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SdcError


def output_paths(out: Path, seeds: list[int]) -> list[Path]:
    out = Path(out)
    if out.suffix.lower() == ".png":
        folder = out.parent
        paths = [out] if len(seeds) == 1 else \
            [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(len(seeds))]
    elif out.suffix:
        raise SdcError(f"--out {out}: expected a .png file or a folder")
    else:
        folder = out
        paths = []
        for seed in seeds:
            p, n = folder / f"{seed}.png", 1
            while p.exists() or p in paths:
                p, n = folder / f"{seed}-{n}.png", n + 1
            paths.append(p)
    if folder.exists() and not folder.is_dir():
        raise SdcError(f"--out {out}: {folder} is a file, expected a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdcError(f"--out {out}: cannot create {folder} ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise SdcError(f"--out {out}: {folder} is not writable")
    return paths
