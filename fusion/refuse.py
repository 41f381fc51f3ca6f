"""`sdc build --from ARTIFACTS --lora ...`: a new build from an existing one, fused in numpy.

No torch, no export: the base build's files are hard-linked into the new build (copied where the
filesystem cannot link), except the external-data files of graphs the adapters change, which are
copied with those weights replaced at the offsets the manifest records (a fused weight has the base
weight's dtype and shape, so every offset stays valid and model.onnx is untouched). The new
manifest is the base's with those files re-hashed, the adapters reported and a new build key;
it is written last and the directory renamed into place, like any build.

The graphs' parity entries are the base build's (no torch here to re-check against); that the
re-fused graphs equal a `sdc build --lora` of the same adapters is what the tests assert.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..errors import SdcError
from ..runtime import manifest as mf
from ..runtime import store
from .artifact import fusion_jobs, load_adapters, known_modules, write_fused_copies
from .fuse import plan, report
from .fuse import LoraSpec


def refuse(from_dir: Path, specs: list[LoraSpec], out: Path | None, force: bool = False,
           artifacts_root: Path = Path("artifacts"),
           log: Callable[[str], None] = print) -> tuple[Path, dict, bool]:
    """Returns (output folder, manifest, reused)."""
    from ..export.build import check_out
    from ..export.memory import process_peak_rss_bytes

    t0 = time.perf_counter()
    from_dir = Path(from_dir).absolute()
    if not specs:
        raise SdcError("--from needs at least one --lora to fuse")
    base = mf.load_manifest(from_dir)
    # Every byte is hashed: a tampered base re-hashed into a new build would verify clean there.
    problems = mf.verify_files(from_dir, base, hashes=True)
    if problems:
        raise SdcError(f"--from {from_dir}: {len(problems)} file(s) do not match its manifest "
                       f"({problems[0]}); rebuild it first")
    adapters = load_adapters(specs, known_modules(base, from_dir))
    jobs = fusion_jobs(from_dir, base, plan(adapters))
    names = "+".join([base["base_model"]["name"]] + [Path(s.path).stem for s in specs])
    out = Path(out or artifacts_root / f"{names}-{base['precision']}").absolute()
    if out == from_dir:
        raise SdcError("--out must differ from --from: the base build stays as it is")
    listed = check_out(out)
    key = hashlib.sha256(json.dumps(
        {"base": base["build_key"], "loras": [[lo.sha256, s.weight, s.blocks]
                                              for lo, s in adapters]}, sort_keys=True).encode()).hexdigest()
    if not force and mf.is_sdc_build(out):
        try:
            old = mf.load_manifest(out)
        except SdcError:
            old = None
        if old and old.get("build_key") == key and not mf.verify_files(out, old, hashes=True):
            log(f"up to date: {out} (build key {key[:12]}); --force rebuilds")
            return out, old, True
    patched = {f"{j.stage}/{base['graphs'][j.stage]['weights']['data_file']}" for j in jobs}
    with store.staging(out) as tmp:
        manifest = copy.deepcopy(base)
        for rel in base["files"]:
            src, dst = mf.contained(from_dir, rel, "manifest files entry"), tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel not in patched:
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
        entries, max_delta = write_fused_copies(
            jobs, {rel: (from_dir / rel, tmp / rel) for rel in sorted(patched)})
        manifest["files"].update(entries)
        for rel in sorted(patched):
            n = sum(1 for j in jobs if rel.startswith(j.stage + "/"))
            log(f"[{rel.split('/')[0]}] fused {n} weights into a copy of {rel}")
        report_ = report(adapters, max_delta)
        manifest.update(
            build_key=key, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            loras=[{**r, "applied": "refuse"} for r in report_],
            refused_from={"path": str(from_dir), "build_key": base["build_key"]},
            build={"seconds": round(time.perf_counter() - t0, 2),
                   "peak_rss_bytes": process_peak_rss_bytes()})
        mf.write_manifest(tmp, manifest)
        store.commit(tmp, out, listed)
    log(f"wrote {out} in {manifest['build']['seconds']:.1f} s (re-fused from {from_dir.name}, "
        "no torch)")
    return out, manifest, False
