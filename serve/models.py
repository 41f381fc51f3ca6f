"""The builds a server offers, looked up by name (never by a path a request gives), and the one
Engine loaded at a time.

`--artifacts DIR` is either one build (it holds manifest.json) or a folder of builds (each
sub-folder that holds one; at most MAX_BUILDS). A model is named as A1111 names checkpoints: the
title "NAME [HASH]" with NAME the build folder's name and HASH the base model's short hash; a
request may give the title or the name. Switching loads and verifies the new build (every file's
sha256) before the old Engine is released: a build that fails verification is refused and the
server keeps serving the one it had.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import SdcError
from ..runtime.engine import Engine
from ..runtime.manifest import is_sdc_build, load_manifest

MAX_BUILDS = 256


@dataclass
class Model:
    name: str
    title: str
    hash: str
    sha256: str
    folder: Path

    def a1111(self) -> dict:
        return {"title": self.title, "model_name": self.name, "hash": self.hash,
                "sha256": self.sha256, "filename": self.name, "config": None}


def find_models(artifacts: Path) -> dict[str, Model]:
    """{name: Model} for the builds at `artifacts`."""
    root = Path(artifacts)
    if is_sdc_build(root):
        folders = [root]
    elif root.is_dir():
        folders = [d for d in sorted(root.iterdir()) if d.is_dir() and is_sdc_build(d)]
        if len(folders) > MAX_BUILDS:
            raise SdcError(f"--artifacts {artifacts}: {len(folders)} builds, over {MAX_BUILDS}; "
                           "point --artifacts at a smaller folder")
    else:
        raise SdcError(f"--artifacts {artifacts}: not a folder; expected a build or a folder of "
                       "builds (`sdc build --out DIR`)")
    models = {}
    for folder in folders:
        base = load_manifest(folder)["base_model"]
        short = base.get("a1111_hash") or base["sha256"][:10]
        models[folder.name] = Model(folder.name, f"{folder.name} [{short}]", short,
                                    base["sha256"], folder)
    if not models:
        raise SdcError(f"--artifacts {artifacts}: no sdc builds there (no manifest.json); run "
                       "`sdc build` first")
    return models


class Models:
    """The registry and the loaded Engine. Callers hold `lock` (the job worker does)."""

    def __init__(self, artifacts: Path, engine_options: dict, default: str | None = None):
        self.artifacts = Path(artifacts)
        self.engine_options = engine_options
        self.available = find_models(self.artifacts)
        self.current: Model = self.lookup(default) if default else \
            self.available[sorted(self.available)[0]]
        self.engine: Engine | None = None
        self.lock = threading.Lock()
        # folder -> the file identities its last verification saw: switching back to a build
        # costs a stat per file, not a hash of every file (a client alternating models)
        self._verified: dict[Path, dict] = {}

    def refresh(self) -> None:
        """Re-scan the folder (a new build dropped in appears without a restart)."""
        self.available = find_models(self.artifacts)

    def lookup(self, name: str) -> Model:
        for m in self.available.values():
            if name in (m.title, m.name):
                return m
        names = ", ".join(m.title for m in self.available.values())
        raise SdcError(f"sd_model_checkpoint={name!r}: no such model (available: {names})")

    def load(self, model: Model | None = None) -> Engine:
        """The Engine for `model` (default: the current one), verified; switches if needed."""
        model = model or self.current
        if self.engine is not None and self.engine.folder == model.folder:
            return self.engine
        engine = Engine(model.folder, keep_sessions=True, **self.engine_options)
        known = self._verified.get(model.folder)
        if known is not None:  # verified before: only files changed since are hashed again
            engine.adopt_verification(known)
        else:
            engine.verify(hashes=True)  # a build that fails is refused; the old one stays loaded
        self._verified[model.folder] = engine.verified_identities()
        if self.engine is not None:
            self.engine.close()
        self.engine = engine
        return engine

    def select(self, name: str) -> Model:
        """Make `name` the current model (A1111's options.sd_model_checkpoint) and load it."""
        model = self.lookup(name)
        self.load(model)
        self.current = model
        return model
