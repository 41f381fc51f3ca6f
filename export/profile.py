"""The build's measured memory profile: one fresh subprocess per stage (runtime/memory_profile.py)
opens the stage's graphs the way `sdc run` does and records peak resident memory and time at
reference shapes; the manifest stores the numbers, and the runtime's planner reads nothing else.

A subprocess per stage, because a process's heap keeps what earlier work left behind: measured
in the build's own process (torch loaded, the UNet just exported) a stage's peak would mix in
the exporter's leftovers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..errors import SdcError
from ..runtime.memory import fmt_bytes

WHAT = ("peak resident memory (VmHWM) above the level before each unit, in a fresh process per "
        "stage, sessions opened as `sdc run` opens them; run_s / load_s in seconds")


def profile_build(folder: Path, graphs: dict, model: dict, family: dict,
                  log: Callable[[str], None]) -> dict:
    """`family`: the manifest's family block (the stages' roles, the text encoders)."""
    t_start = time.perf_counter()
    stages = {}
    baseline = None
    runtime_held = first_session = 0
    for stage, graph in graphs.items():
        encoder = next((e for e in family["text_encoders"] if e["stage"] == stage), {})
        job = {"folder": str(folder), "stage": stage, "graph": graph, "model": model,
               "family": family["name"], "role": family["roles"][stage],
               "tokenizer": encoder.get("tokenizer"),
               "tokenizer_kind": encoder.get("kind", "clip")}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(job, f)
        try:
            proc = subprocess.run([sys.executable, "-m", "sdc.runtime.memory_profile", f.name],
                                  capture_output=True, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
        finally:
            os.unlink(f.name)
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise SdcError(f"[{stage}] memory profile failed ({tail}); the build was not written")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        baseline = result["baseline_bytes"] if baseline is None else min(baseline,
                                                                          result["baseline_bytes"])
        runtime_held = max(runtime_held, result.get("runtime_held_bytes", 0))
        first_session = max(first_session, result["first_session_bytes"])
        stages[stage] = result["units"]
        whole = result["units"]["whole"]["points"][-1]
        log(f"[{stage}] measured peak {fmt_bytes(whole['peak'])} at "
            + (f"{whole['lat']}² latents" if "lat" in whole else f"batch {whole['batch']}")
            + (f", {len(result['units']['chunks'])} chunks" if "chunks" in result["units"] else "")
            + (", tiled decoder" if "tiled" in result["units"] else ""))
    return {"what": WHAT, "baseline_bytes": baseline, "runtime_held_bytes": runtime_held,
            "first_session_bytes": first_session,
            "seconds": round(time.perf_counter() - t_start, 1), "graphs": stages}
