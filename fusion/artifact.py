"""LoRA fusion against a finished build, torch-free: read base weights out of the graphs'
external data through the manifest's weight table, fuse in numpy, and either hand the results to
onnxruntime at session creation (run-time swap) or write a new build (re-fuse).

The manifest's `graphs.<stage>.weights` holds `map` {module parameter: initializer} and `data`
{initializer: [offset, length, dtype, shape]} in `data_file`: everything needed to find a weight's
bytes without onnx or torch. Both paths start from the *base* build's bytes every time, so
switching adapters A -> B -> A gives A's weights bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SdcError
from .fuse import Applied, LoraSpec, fuse_param, plan, report
from .lora import Known, read_lora

# the roles whose graphs hold weights a LoRA changes
LORA_ROLES = ("text", "denoise", "upscale")


def build_family(manifest: dict):
    """The family a build was made from (its manifest's `family` block; SD1 for a manifest
    without one)."""
    from ..families import family, of_manifest

    if "family" in manifest:
        return of_manifest(manifest)
    return family(manifest.get("base_model", {}).get("family", "sd1"))


def stage_of(manifest: dict) -> dict[str, str]:
    """{LoRA-able component: the build's stage holding it} over the stages the build has, from
    its family: SD1.x/SD2.x unet, text_encoder; SDXL also text_encoder_2."""
    fam = build_family(manifest)
    roles = manifest.get("family", {}).get("roles") or {s.stage: s.role for s in fam.specs}
    out = {}
    for spec in fam.specs:
        if roles.get(spec.stage) in LORA_ROLES and (spec.component in fam.diffusers_prefixes
                                                    or spec.component in dict(fam.lora_alternates)):
            out.setdefault(spec.component, spec.stage)
    return out


def check_float(manifest: dict, folder: Path) -> None:
    """LoRAs are fused into float weights, never into dequantized ones: a quantized build is
    refused by name, pointing at its float source."""
    q = manifest.get("quantized_from")
    if q:
        fmts = ", ".join(f"{s} {g['precision']}" for s, g in manifest["graphs"].items())
        raise SdcError(f"{folder} is a quantized build ({fmts}); LoRAs are fused into its float "
                       f"weights before quantizing: sdc build --from {folder} --lora PATH "
                       f"(re-quantizes from its float source {q['path']})")


def known_modules(manifest: dict, folder: Path | None = None) -> Known:
    """{component: {module path with a .weight: its shape (None where the weight is not in the
    data table)}} from a build's weight maps, for the build's family (`Known.family`)."""
    check_float(manifest, folder or Path("this build"))
    out = {}
    for component, stage in stage_of(manifest).items():
        graph = manifest["graphs"].get(stage)
        if graph:
            weights = graph["weights"]
            data = weights.get("data", {})
            out[component] = {
                p.removesuffix(".weight"): (tuple(data[init][3]) if init in data else None)
                for p, init in weights["map"].items() if p.endswith(".weight")}
            # modules the graph does not compute with (SDXL's last CLIP layer): a LoRA may
            # name them, and fusing them changes nothing
            out[component].update({p.removesuffix(".weight"): None
                                   for p in weights.get("unused", []) if p.endswith(".weight")})
    return Known(out, build_family(manifest))


def load_adapters(specs: list[LoraSpec], known: dict, family=None):
    """Every spec's file read against `known` (its family: `family`, else `known.family`)."""
    return [(read_lora(spec.path, known, family), spec) for spec in specs]


def _check_base(manifest: dict, folder: Path) -> None:
    if manifest.get("loras"):
        names = ", ".join(lo["name"] for lo in manifest["loras"])
        raise SdcError(f"{folder} already has LoRA(s) fused ({names}); fusing again needs the "
                       "base weights: use a build made without --lora")


@dataclass
class Job:
    """One weight to fuse: where its base bytes are and what goes into it."""

    stage: str
    param: str
    init: str
    info: list  # [offset, length, dtype, shape] in the stage's data file
    data_file: Path
    terms: list

    def run(self) -> tuple[np.ndarray, dict[str, float]]:
        base = read_weight(self.data_file, self.info)
        return fuse_param(f"{self.stage} {self.param}", base, self.terms, base.dtype)


def fusion_jobs(folder: Path, manifest: dict, applied: Applied) -> list[Job]:
    """What the adapters change in this build, checked before any weight is read."""
    _check_base(manifest, folder)
    stages = stage_of(manifest)
    jobs = []
    for (component, param), terms in sorted(applied.terms.items(), key=lambda kv: kv[0]):
        stage = stages.get(component, component)
        graph = manifest["graphs"].get(stage)
        if graph is None:
            raise SdcError(f"this build has no {stage} graph, which the LoRA changes; rebuild "
                           f"with the {stage} stage")
        weights = graph["weights"]
        if param in weights.get("unused", ()):
            continue  # not in the graph: nothing to change
        init = weights["map"].get(param)
        info = weights.get("data", {}).get(init)
        if info is None:
            raise SdcError(f"{stage} weight {param} is not stored as external data in {folder} "
                           "(built by an older sdc?); rebuild to fuse or swap LoRAs without torch")
        jobs.append(Job(stage, param, init, info, folder / stage / weights["data_file"], terms))
    return jobs


def _merge_deltas(into: dict[str, float], deltas: dict[str, float]) -> None:
    for source, d in deltas.items():
        into[source] = max(into.get(source, 0.0), d)


def fused_initializers(folder: Path, manifest: dict, applied: Applied
                       ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """{stage: {initializer name: fused array}} and max |delta| per adapter file."""
    out: dict[str, dict[str, np.ndarray]] = {}
    max_delta: dict[str, float] = {}
    for job in fusion_jobs(folder, manifest, applied):
        fused, deltas = job.run()
        out.setdefault(job.stage, {})[job.init] = fused
        _merge_deltas(max_delta, deltas)
    return out, max_delta


def read_weight(data_file: Path, info: list) -> np.ndarray:
    offset, length, dtype, shape = info
    arr = np.fromfile(data_file, dtype=np.dtype(dtype), count=length // np.dtype(dtype).itemsize,
                      offset=offset)
    return arr.reshape(shape)


def prepare(folder: Path, manifest: dict, specs: list[LoraSpec]):
    """Read the adapters against the build and fuse: ({stage: {init: array}}, manifest report)."""
    adapters = load_adapters(specs, known_modules(manifest, folder))
    fused, max_delta = fused_initializers(folder, manifest, plan(adapters))
    return fused, report(adapters, max_delta)


def write_fused_copies(jobs: list[Job], files: dict[str, tuple[Path, Path]]
                       ) -> tuple[dict[str, dict], dict[str, float]]:
    """For each {rel: (src, dst)} data file, write dst = src with its jobs' fused weights, fusing
    on a worker thread in file order while the main thread streams, patches and hashes (numpy,
    file I/O and sha256 all release the GIL, so the two overlap on two cores: 20.4 s for a
    separate fuse, copy and hash of the SD1.5 UNet with a rank-32 LoRA, measured). Returns
    ({rel: manifest file entry}, max |delta| per adapter file)."""
    from concurrent.futures import ThreadPoolExecutor

    entries: dict[str, dict] = {}
    max_delta: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        for rel, (src, dst) in files.items():
            mine = sorted((j for j in jobs if j.data_file == src), key=lambda j: j.info[0])
            futures = [(j.info, pool.submit(j.run)) for j in mine]

            def patches(futures=futures):
                for info, fut in futures:
                    fused, deltas = fut.result()
                    _merge_deltas(max_delta, deltas)
                    yield info, fused

            entries[rel] = copy_patched(src, dst, patches())
    return entries, max_delta


def copy_patched(src: Path, dst: Path, patches_in, chunk: int = 64 * 2**20) -> dict:
    """Write src to dst with weights replaced, hashing as it goes: one read and one write of the
    file, no second pass to hash. `patches_in` yields ([offset, length, dtype, shape], array) in
    increasing offset order, and is only drawn from when the stream reaches the next offset (so
    the arrays may still be being computed). Returns the manifest's file entry for dst."""
    import hashlib

    source = iter(patches_in)
    patches: list[tuple[int, memoryview]] = []

    def pull() -> bool:
        item = next(source, None)
        if item is None:
            return False
        (offset, length, dtype, shape), arr = item
        raw = memoryview(np.ascontiguousarray(arr, dtype=np.dtype(dtype))).cast("B")  # no copy
        if len(raw) != length or list(arr.shape) != list(shape):
            raise AssertionError(f"fused weight at offset {offset} does not fit its slot")
        if patches and offset < patches[-1][0]:
            raise AssertionError("patches must come in offset order")
        patches.append((offset, raw))
        return True

    more = pull()
    h = hashlib.sha256()
    size = 0
    buffer = bytearray(chunk)
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        pos, k = 0, 0
        while n := fin.readinto(buffer):
            buf = memoryview(buffer)[:n]
            end = pos + n
            while more and patches[-1][0] < end:
                more = pull()
            while k > 0 and patches[k - 1][0] + len(patches[k - 1][1]) > pos:
                k -= 1  # a patch that started in an earlier chunk may continue in this one
            j = k
            while j < len(patches) and patches[j][0] < end:
                off, raw = patches[j]
                lo, hi = max(off, pos), min(off + len(raw), end)
                if lo < hi:
                    buf[lo - pos:hi - pos] = raw[lo - off:hi - off]
                j += 1
            k = j
            h.update(buf)
            fout.write(buf)
            size += len(buf)
            pos = end
    return {"sha256": h.hexdigest(), "bytes": size}
