"""The locked dependency sets (requirements/*.txt, issue 22): the suite runs on exactly the lock, the lock
satisfies pyproject.toml's ranges, the runtime lock carries no torch stack, and sdc's own check of
transformers' peft requirement speaks in one line.

`make test-latest` runs this suite against unlocked newest releases on purpose; there the
"installed == lock" test is skipped (SDC_TEST_LATEST=1), the rest still hold.
"""
from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def read_lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def extra_requirements(extra: str) -> list[Requirement]:
    """pyproject's requirements for an extra, sdc[...] self-references expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out, todo, seen = [Requirement(r) for r in project["dependencies"]], [extra], set()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        for text in project["optional-dependencies"][e]:
            req = Requirement(text)
            if req.name == project["name"]:
                todo += sorted(req.extras)
            else:
                out.append(req)
    return out


@pytest.mark.parametrize("lock, extra", [("dev.txt", "dev"), ("runtime.txt", "runtime"),
                                         ("runtime.txt", "quantize")])
def test_lock_satisfies_pyproject(lock, extra):
    pins = read_lock(lock)
    for req in extra_requirements(extra):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject [{extra}]) missing from requirements/{lock}: make lock"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"requirements/{lock} pins {name}=={pins[name]}, outside pyproject's {req}: make lock")


def test_runtime_lock_has_no_torch_stack():
    pins = read_lock("runtime.txt")
    assert not {"torch", "diffusers", "transformers", "peft", "onnxscript"} & set(pins)
    # onnx (protobuf only) is there for the torch-free quantizer (the `quantize` extra)
    assert {"onnxruntime", "numpy", "tokenizers", "pillow", "click", "rich", "onnx"} <= set(pins)


def test_torch_is_the_cpu_pin():
    pins = read_lock("dev.txt")
    assert pins["torch"] == "2.13.0+cpu"
    assert not [p for p in pins if p.startswith("nvidia-")], "a CUDA torch stack crept into the lock"


@pytest.mark.skipif(os.environ.get("SDC_TEST_LATEST") == "1", reason="make test-latest: unlocked on purpose")
def test_suite_runs_on_the_lock():
    drift = {}
    for name, pinned in read_lock("dev.txt").items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != pinned:
            drift[name] = (pinned, have)
    assert not drift, f"installed set differs from requirements/dev.txt (locked, installed): {drift}; make venv"


def test_unbounded_overrides_lift_upper_bounds(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("unbounded", ROOT / "requirements" / "unbounded.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["a>=1,<2", "b>=3"]\n'
        '[project.optional-dependencies]\ne = ["x[f]", "torch>=2,<3", "c==1.0", "d~=1.2,!=1.3"]\n')
    assert mod.overrides(tmp_path / "pyproject.toml") == ["a>=1", "c", "d~=1.2"]


def test_peft_stack_check_speaks_one_line(monkeypatch):
    from sdc.errors import SdcError
    from sdc.training import stack

    if os.environ.get("SDC_TEST_LATEST") != "1":
        stack.check_peft_stack()  # the locked set is consistent: no error
    # transformers 5.24 with peft 0.21.2 (what the registry served on 2026-12-01):
    monkeypatch.setattr(stack, "required_peft", lambda: "0.22.0")
    monkeypatch.setattr(stack, "installed", {"peft": "0.21.2", "transformers": "5.24.0"}.get)
    with pytest.raises(SdcError) as err:
        stack.check_peft_stack()
    msg = str(err.value)
    assert "\n" not in msg and "transformers 5.24.0" in msg and "peft >= 0.22.0" in msg and "0.21.2" in msg
