"""Write uv overrides that drop every upper bound in pyproject.toml's dependencies, for `make test-latest`.

`make test-latest` asks the registry for the newest release of everything sdc depends on, including the
releases our upper bounds exclude (that is how a bound is found stale, or a new break is found before a
user finds it). A bound is dropped by overriding the requirement with its lower bounds only; torch stays
on the CPU pin (a newer torch is a multi-GB CUDA download, not drift we can test here).
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement


def overrides(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    out: dict[str, str] = {}
    for text in reqs:
        req = Requirement(text)
        if req.name == project["name"] or req.name == "torch":
            continue
        lower = [str(s) for s in req.specifier if s.operator in (">=", ">", "~=")]
        if len(lower) != len(req.specifier):  # has an upper bound or pin: override it
            out[req.name] = req.name + ",".join(lower)
    return sorted(out.values())


if __name__ == "__main__":
    sys.stdout.write("".join(line + "\n" for line in overrides(Path(sys.argv[1]))))
