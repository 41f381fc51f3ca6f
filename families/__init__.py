"""Model families (torch-free): sd1, sd2, sdxl, deepfloyd. See families/base.py."""

from __future__ import annotations

from ..errors import SdcError
from .base import Family, TextEncoder  # noqa: F401
from .sd1 import SD1  # noqa: F401 - the default family (sdc-tiny, SD1.x)
from .graph_spec import ROLES, GraphSpec, ModelDims, TensorSpec  # noqa: F401
from .sd2 import SD2
from .sdxl import SDXL
from .deepfloyd import DEEPFLOYD

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL, DEEPFLOYD)}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise SdcError(f"model family {name!r} is not one sdc builds; expected one of "
                       f"{', '.join(FAMILIES)}") from None


def of_manifest(manifest: dict) -> Family:
    """The family a build was made from (its manifest's `family` block)."""
    return family(manifest["family"]["name"])


def dims_of(model: dict) -> ModelDims:
    """ModelDims back from a manifest's `model` block."""
    return ModelDims(**{k: model[k] for k in ModelDims.__dataclass_fields__ if k in model})
