"""manifest.json: the only contract between `sdc build` and `sdc run` (torch-free).

The build writes it last, inside a temporary directory that is renamed into place only after the
parity gate passes, so a directory with a manifest is a complete build. It records every file's
sha256 and size, each graph's I/O schema and parity results, the model constants the runtime needs
(latent channels, VAE factor, scaling factor) and the weight-name map for re-fusing adapters.

This module reads and checks manifests; it never guesses file names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import SdcError

MANIFEST = "manifest.json"
FORMAT = "sdc-artifacts"
FORMAT_VERSION = 1
# Stage order of a text-to-image run, written into every manifest as data.
PIPELINE = ("text_encoder", "unet", "vae_decoder")


def sha256_file(path: Path, chunk: int = 4 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, path: Path) -> tuple[str, dict]:
    return path.relative_to(root).as_posix(), {"sha256": sha256_file(path),
                                               "bytes": path.stat().st_size}


def is_sdc_build(folder: Path) -> bool:
    """True when `folder` holds a manifest written by sdc (any format version)."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_manifest(folder: Path) -> dict:
    """Read and validate folder/manifest.json; one-line SdcError on anything unusable."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SdcError(f"artifacts not found: {folder}; run `sdc build` first or pass -a DIR")
    if not path.is_file():
        raise SdcError(f"{folder}: no {MANIFEST}; not a complete sdc build (an interrupted build "
                       "leaves none), run `sdc build` again")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise SdcError(f"{path}: not valid JSON ({e}); rebuild with `sdc build --force`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SdcError(f"{path}: not an sdc manifest (format={manifest.get('format')!r} if a dict); "
                       "rebuild with `sdc build`")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SdcError(f"{path}: manifest format {version} is newer than this sdc reads "
                       f"({FORMAT_VERSION}); upgrade sdc or rebuild with this version")
    for key in ("build_key", "graphs", "files", "model", "precision"):
        if key not in manifest:
            raise SdcError(f"{path}: manifest lacks '{key}'; rebuild with `sdc build --force`")
    return manifest


def verify_files(folder: Path, manifest: dict, hashes: bool = True) -> list[str]:
    """Problems with the files the manifest lists (missing, size or sha256 mismatch); [] if none."""
    problems = []
    for rel, entry in manifest["files"].items():
        path = Path(folder) / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif hashes and sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (modified or corrupted)")
    return problems


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return path
