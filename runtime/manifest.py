"""manifest.json: the only contract between `sdc build` and `sdc run` (torch-free).

The build writes it last, inside a temporary directory that is renamed into place only after the
parity gate passes, so a directory with a manifest is a complete build. It records every file's
sha256 and size, each graph's I/O schema and parity results, the model constants the runtime needs
(latent channels, VAE factor, scaling factor) and the weight-name map for re-fusing adapters.

This module reads and checks manifests; it never guesses file names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SdcError
from .manifest_schema import check_manifest
from .store import MANIFEST, check_relative, contained, file_entry, sha256_file  # noqa: F401 (re-exported)

FORMAT = "sdc-artifacts"
FORMAT_VERSION = 1
# The first build layout with a `family` block (families/): what this runtime reads.
FAMILY_LAYOUT = 6
# A manifest is a few hundred kB even for full-size builds with chunks; refuse absurd ones unread.
MAX_MANIFEST_BYTES = 64 * 2**20


def is_sdc_build(folder: Path) -> bool:
    """True when `folder` holds a manifest written by sdc (any format version)."""
    try:
        path = Path(folder) / MANIFEST
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(path.read_text())
        return isinstance(data, dict) and data.get("format") == FORMAT
    except (OSError, ValueError, RecursionError):
        return False


def _no_manifest(folder: Path) -> SdcError:
    """Say what the folder is, when it is not an sdc build: another tool's export or leftovers."""
    index = folder / "model_index.json"
    graphs = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.onnx"))
    if index.is_file():
        try:
            cls = json.loads(index.read_text()).get("_class_name", "?")
        except (ValueError, AttributeError, OSError, RecursionError):
            return SdcError(f"{folder}: no {MANIFEST}, and its model_index.json is not a JSON object; "
                            "not an sdc build — build one with `sdc build`")
        if graphs:
            return SdcError(f"{folder}: an ONNX export by another tool ({cls}, {len(graphs)} graphs, "
                            f"no {MANIFEST}), not an sdc build: sdc runs only builds it can verify; "
                            "build from the original model with `sdc build`")
        return SdcError(f"{folder}: a diffusers model folder ({cls}), not a build; build it first: "
                        f"`sdc build {folder}`")
    return SdcError(f"{folder}: no {MANIFEST}; not a complete sdc build (an interrupted build leaves "
                    "none), run `sdc build` again")


def load_manifest(folder: Path, any_layout: bool = False) -> dict:
    """Read folder/manifest.json and check it once: schema (every key readers use, typed) and
    containment (every path it names stays inside `folder`). One-line SdcError on anything else.
    `any_layout`: also read a build made before model families (to list the files a rebuild over
    it replaces); everything that runs a build reads the current layout only."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SdcError(f"artifacts not found: {folder}; run `sdc build` first or pass -a DIR")
    if not path.is_file():
        raise _no_manifest(folder)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise SdcError(f"{path}: {path.stat().st_size} bytes, over the {MAX_MANIFEST_BYTES // 2**20} "
                       "MiB a manifest can be; not an sdc manifest, rebuild with `sdc build`")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise SdcError(f"{path}: not valid JSON ({str(e)[:80]}); rebuild with `sdc build --force`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise SdcError(f"{path}: not an sdc manifest (format {found!r}, expected {FORMAT!r}); "
                       "rebuild with `sdc build`")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SdcError(f"{path}: malformed manifest: format_version is {version!r}, expected an "
                       "integer >= 1; rebuild with `sdc build --force`")
    if version > FORMAT_VERSION:
        raise SdcError(f"{path}: manifest format {version} is newer than this sdc reads "
                       f"({FORMAT_VERSION}); upgrade sdc or rebuild with this version")
    if "family" not in manifest and not any_layout:
        raise SdcError(f"{path}: built by an older sdc (build layout {manifest.get('layout', '?')}, "
                       f"before model families); this sdc runs layout {FAMILY_LAYOUT} and later: "
                       "rebuild it with `sdc build --force`")
    older = "family" not in manifest  # an older layout, read only for its files table
    if older:
        manifest = {**manifest, "family": {"name": "sd1", "roles": {}, "pipeline": [],
                                           "conditioning": "text", "text_encoders": []}}
    check_manifest(manifest, str(path))
    if not older:
        _check_family(manifest, path)
    for rel in manifest["files"]:
        contained(folder, rel, "manifest files entry")
    needed = referenced_files(manifest)
    for rel, what in needed.items():
        contained(folder, rel, what)
    unlisted = sorted(set(needed) - set(manifest["files"]))
    if unlisted:
        raise SdcError(f"{path}: {len(unlisted)} file(s) the graphs need are not in the manifest's "
                       f"files table ({', '.join(unlisted[:3])}), so they cannot be verified; "
                       "rebuild with `sdc build --force`")
    return manifest


def referenced_files(manifest: dict) -> dict[str, str]:
    """{relative path: what names it} for every file a reader of this manifest opens."""
    out: dict[str, str] = {}
    for stage, graph in manifest["graphs"].items():
        if not any(f.endswith(".onnx") for f in graph["files"]):
            raise SdcError(f"manifest: graphs.{stage}.files names no .onnx graph; rebuild with "
                           "`sdc build --force`")
        for f in graph["files"]:
            out[f] = f"graphs.{stage}.files"
        if (data_file := graph.get("weights", {}).get("data_file")) is not None:
            check_relative(data_file, f"graphs.{stage}.weights.data_file", Path("manifest"))
            out[f"{stage}/{data_file}"] = f"graphs.{stage}.weights.data_file"
        if tiled := graph.get("tiled"):
            for f in tiled["files"] + [s["file"] for s in tiled["segments"]]:
                out[f] = f"graphs.{stage}.tiled"
        if chunks := graph.get("chunks"):
            for f in chunks["files"]:
                out[f] = f"graphs.{stage}.chunks.files"
            for part in chunks["parts"]:
                check_relative(part["file"], f"graphs.{stage}.chunks.parts", Path("manifest"))
                out[f"{stage}/{part['file']}"] = f"graphs.{stage}.chunks.parts"
    for f in manifest["tokenizer"]["files"]:
        out[f] = "tokenizer.files"
    out[manifest["scheduler"]["config"]] = "scheduler.config"
    return out


def verify_files(folder: Path, manifest: dict, hashes: bool = True) -> list[str]:
    """Problems with the files the manifest lists (missing, not a regular file, size or sha256
    mismatch); [] if none. Paths were contained by `load_manifest`; they are re-resolved here, so a
    symlink swapped in since is caught too."""
    problems = []
    if not manifest["files"]:
        return ["the manifest lists no files"]
    for rel, entry in manifest["files"].items():
        path = contained(folder, rel, "manifest files entry")
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif hashes and sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (modified or corrupted)")
    # sdc writes no symlinks; one inside a build could hand a graph (whose external-data names
    # are not visible without onnx) a file from elsewhere.
    problems += [f"{rel}: a symlink, which sdc never writes" for rel in symlinks_inside(folder)]
    return problems


def symlinks_inside(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            if os.path.islink(os.path.join(dirpath, name)):
                out.append(Path(dirpath, name).relative_to(folder).as_posix())
    return sorted(out)


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write the manifest (into a private staging directory: the build's last file)."""
    path = Path(folder) / MANIFEST
    check_manifest(manifest, "sdc wrote a manifest that")  # a bug here must not ship a build
    path.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return path


def _check_family(manifest: dict, path: Path) -> None:
    """The `family` block names graphs the build has, in roles the runtime knows."""
    from ..families.graph_spec import ROLES

    fam = manifest["family"]
    roles = fam["roles"]

    def bad(what: str) -> SdcError:
        return SdcError(f"{path}: malformed manifest: family.{what}; rebuild with "
                        "`sdc build --force`")

    for stage, role in roles.items():
        if role not in ROLES:
            raise bad(f"roles.{stage} is {role!r}, expected one of {', '.join(ROLES)}")
    for stage in manifest["pipeline"]:
        if stage not in roles:
            raise bad(f"roles has no entry for pipeline stage {stage!r}")
    for role in ("denoise", "decode"):
        if sum(r == role for s, r in roles.items() if s in manifest["pipeline"]) > 1:
            raise bad(f"roles gives {role!r} to more than one pipeline stage")
    for enc in fam["text_encoders"]:
        if roles.get(enc["stage"]) not in (None, "text"):
            raise bad(f"text_encoders names {enc['stage']!r}, whose role is not text")
        check_relative(enc["tokenizer"], "family.text_encoders.tokenizer", path)
        if "/" in enc["tokenizer"] or enc["tokenizer"] in (".", ".."):
            raise bad(f"text_encoders tokenizer {enc['tokenizer']!r} is not a folder name")
    if fam["conditioning"] not in ("text", "text_time"):
        raise bad(f"conditioning is {fam['conditioning']!r}, expected text or text_time")
    for enc in fam["text_encoders"]:
        if enc.get("kind", "clip") not in ("clip", "t5"):
            raise bad(f"text_encoders kind {enc['kind']!r}, expected clip or t5")
    space = fam.get("space", "latent")
    if space not in ("latent", "pixel"):
        raise bad(f"space is {space!r}, expected latent or pixel")
    up = (manifest.get("cascade") or {}).get("upscale")
    if up is not None:
        if roles.get(up["stage"]) != "upscale":
            raise bad(f"cascade names {up['stage']!r}, whose role is not upscale")
        if not 1 <= up["factor"] <= 16 or not 0 <= up["noise_level"] < 100_000:
            raise bad(f"cascade factor {up['factor']} / noise_level {up['noise_level']} out of "
                      "range")
        for key in ("scheduler", "noising_scheduler"):
            check_relative(up[key]["config"], f"cascade.upscale.{key}.config", path)
    elif any(r == "upscale" and s in manifest["graphs"] for s, r in roles.items()):
        raise bad("roles has an upscale stage but the manifest no cascade block")



def stages_with(manifest: dict, role: str) -> list[str]:
    """The build's stages doing `role` (families/graph_spec.py ROLES), in pipeline order."""
    roles = manifest["family"]["roles"]
    order = list(manifest["pipeline"]) + [s for s in roles if s not in manifest["pipeline"]]
    # a stage the family has but the build lacks is not offered (a run refuses it by name)
    return [s for s in order if roles.get(s) == role and s in manifest["graphs"]]


def stage_with(manifest: dict, role: str) -> str | None:
    """The build's one stage doing `role`, or None when it has none (an image encoder)."""
    found = stages_with(manifest, role)
    return found[0] if found else None
