"""The training stack's own compatibility rules, checked before sdc leans on them.

transformers declares the peft it needs (`MIN_PEFT_VERSION` in its peft integration, 0.22.0 from 5.24)
but only enforces it deep inside `load_lora_weights`/`add_adapter`, as a traceback from transformers.
sdc checks the same rule up front and says it in one line naming both packages and their versions.
"""
from __future__ import annotations

from importlib import metadata

from packaging.version import Version

from ..errors import SdcError


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def required_peft() -> str | None:
    """The peft floor the installed transformers declares, or None if it declares none."""
    try:
        from transformers.integrations import peft as tf_peft
    except ImportError:
        return None
    return getattr(tf_peft, "MIN_PEFT_VERSION", None)


def check_peft_stack(need: str = "LoRA training and loading") -> None:
    """Raise SdcError when peft is missing or older than what the installed transformers requires."""
    peft = installed("peft")
    tf = installed("transformers")
    if peft is None:
        raise SdcError(f"{need} needs peft; it is not installed: pip install 'sdc[train]' "
                       "(or the tested set: pip install -r requirements/dev.txt)")
    floor = required_peft()
    if floor and Version(peft) < Version(floor):
        raise SdcError(f"transformers {tf} requires peft >= {floor}, found peft {peft}: install the "
                       f"tested set (pip install -r requirements/dev.txt) or a transformers older "
                       f"than {tf} (pip install 'transformers<{tf}')")
