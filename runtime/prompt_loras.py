"""A1111's prompt syntax for adapters, `<lora:NAME:WEIGHT>`, resolved inside one folder.

`<lora:seal>`, `<lora:seal:0.8>` (and A1111's `<lyco:...>` spelling) in a prompt ask for the LoRA
file NAME.safetensors of `--lora-dir`, at WEIGHT (default 1). The tags are taken out of the text
the tokenizer sees (as A1111 does) and stay in the prompt recorded in the PNG, so pasting it back
reproduces the image. NAME is a name, never a path: it is looked up among the folder's files
(recursively, by file stem), so `../x`, `/etc/x` and names with separators are refused, and a file
whose real path leaves the folder (a symlink out) is not listed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SdcError

TAG = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)
NAME = re.compile(r"^[\w][\w .+\-()\[\]]{0,127}$")  # a file stem, no separators
MAX_FILES = 10_000  # a LoRA folder scan is bounded
MAX_TAGS = 16
MAX_WEIGHT = 10.0  # |weight|: A1111 users stay within +-2; beyond 10 nothing sensible comes out


@dataclass
class LoraTag:
    name: str
    weight: float


def split_prompt(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its lora tags, the tags in order)."""
    tags = []
    for m in TAG.finditer(prompt):
        parts = m.group(2).split(":")
        name = parts[0].strip()
        if not NAME.match(name):
            raise SdcError(f"<{m.group(1)}:{m.group(2)}>: expected <lora:NAME:WEIGHT> with NAME a "
                           "LoRA file's name (letters, digits, space, . _ - + ( ) [ ]), not a path")
        weight = 1.0
        if len(parts) > 1 and parts[1].strip():
            try:
                weight = float(parts[1])
            except ValueError:
                weight = math.nan
            if not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
                raise SdcError(f"<lora:{m.group(2)}>: weight {parts[1]!r} is not a number within "
                               f"+-{MAX_WEIGHT:g}; expected e.g. <lora:{name}:0.8>")
        if len(parts) > 2:
            raise SdcError(f"<lora:{m.group(2)}>: expected <lora:NAME> or <lora:NAME:WEIGHT> (block "
                           "weights go on --lora PATH:WEIGHT:BLOCKS)")
        tags.append(LoraTag(name, weight))
    if len(tags) > MAX_TAGS:
        raise SdcError(f"the prompt names {len(tags)} LoRAs; at most {MAX_TAGS} per request")
    return " ".join(TAG.sub(" ", prompt).split()), tags


def lora_index(folder: Path) -> dict[str, Path | None]:
    """{name: file} for the .safetensors files under `folder` (real paths inside it only); None
    for a name that several files share (ambiguous: never one picked silently)."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise SdcError(f"--lora-dir {folder}: not a folder; expected a folder of LoRA "
                       ".safetensors files")
    index: dict[str, Path | None] = {}
    for n, path in enumerate(sorted(root.rglob("*.safetensors"))):
        if n >= MAX_FILES:
            raise SdcError(f"--lora-dir {folder}: more than {MAX_FILES} LoRA files; split the folder")
        real = path.resolve()
        if not real.is_file() or not real.is_relative_to(root):
            continue  # a link out of the folder is not the folder's
        index[path.stem] = None if path.stem in index else path
    return index


def resolve_tags(tags: list[LoraTag], folder: Path | None) -> list:
    """LoraSpecs for `tags`, each NAME looked up in `folder`."""
    from ..fusion.fuse import LoraSpec

    if not tags:
        return []
    if folder is None:
        raise SdcError(f"the prompt asks for <lora:{tags[0].name}> but no LoRA folder is set; "
                       "give --lora-dir DIR (names are looked up there)")
    index = lora_index(folder)
    specs = []
    for tag in tags:
        if tag.name in index and index[tag.name] is None:
            raise SdcError(f"<lora:{tag.name}>: several files in the LoRA folder are named "
                           f"{tag.name}.safetensors; rename one so the name is unique")
        path = index.get(tag.name)
        if path is None:
            near = ", ".join(sorted(n for n, p in index.items() if p)[:8]) or "none"
            raise SdcError(f"<lora:{tag.name}>: no LoRA of that name in the LoRA folder "
                           f"(available: {near})")
        specs.append(LoraSpec(path, tag.weight))
    return specs
