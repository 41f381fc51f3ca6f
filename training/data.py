"""Training images and captions for `sdc train-lora` / `sdc train-embedding`.

A data folder holds images (png, jpg, jpeg, webp, bmp) each with an optional caption file of the
same stem (`img.png` + `img.txt`, kohya's convention); `--instance-prompt` gives every image the
same caption instead (DreamBooth's convention). Everything is checked before any model loads:
an empty folder, an image that does not decode, a caption with no image, an image with neither a
caption nor an instance prompt all fail with one line naming the file.

Images are resized (shorter side to the resolution) and cropped to a square `resolution`; the
crop and a horizontal flip are the augmentations. Each (image, crop, flip) variant is a fixed
item, so its latent can be cached once (cache.py) and every epoch reuses it: `random` crop draws
`crops` offsets per image from the seed, `center` has one.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import SdcError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str
    sha256: str  # of the image file: the cache key, so an edited image is re-encoded


@dataclass(frozen=True)
class Item:
    """One training example: an image variant (crop offset, flip) and its caption."""

    sample: Sample
    left: int
    top: int
    flip: bool

    def key(self, resolution: int) -> str:
        return f"{self.sample.sha256[:16]}-{resolution}-{self.left}-{self.top}-{int(self.flip)}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_folder(folder: Path, instance_prompt: str | None = None) -> list[Sample]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SdcError(f"--data {folder}: not a folder; expected a folder of images with .txt "
                       "captions (or --instance-prompt)")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    stems = {p.stem for p in images}
    orphans = [p.name for p in files if p.suffix == CAPTION_SUFFIX and p.stem not in stems]
    if orphans:
        raise SdcError(f"--data {folder}: caption {orphans[0]} has no image of the same name "
                       f"({len(orphans)} such caption(s)); add the image or remove the caption")
    if not images:
        raise SdcError(f"--data {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found; add "
                       "training images, each with a same-named .txt caption")
    samples = []
    for img in images:
        try:
            with Image.open(img) as im:
                im.verify()  # cheap header + checksum check; decode happens at encode time
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise SdcError(f"--data: cannot read image {img} ({e}); remove or replace it") from None
        cap_file = img.with_suffix(CAPTION_SUFFIX)
        if instance_prompt is not None:
            caption = instance_prompt
        elif cap_file.is_file():
            caption = " ".join(cap_file.read_text(encoding="utf-8").split())
        else:
            raise SdcError(f"--data: image {img.name} has no caption {cap_file.name}; write one, or "
                           "give every image the same caption with --instance-prompt")
        if not caption:
            raise SdcError(f"--data: caption {cap_file} is empty; write what the image shows")
        samples.append(Sample(img, caption, _sha256(img)))
    return samples


def check_trigger(samples: list[Sample], trigger: str) -> None:
    """The trigger is how the adapter is called up; a caption set without it trains an adapter
    that changes every prompt. A warning, not an error: style LoRAs are sometimes trained so."""
    words = trigger.lower()
    missing = sum(words not in s.caption.lower() for s in samples)
    if missing == len(samples):
        warnings.warn(f"trigger {trigger!r} appears in none of the {len(samples)} captions; the "
                      "LoRA will change every prompt. Put the trigger in the captions.",
                      stacklevel=2)
    elif missing:
        warnings.warn(f"trigger {trigger!r} is missing from {missing} of {len(samples)} captions",
                      stacklevel=2)


def items(samples: list[Sample], resolution: int, crop: str, flip: bool, crops: int,
          seed: int) -> list[Item]:
    """The fixed set of image variants to train on (see module doc)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in samples:
        with Image.open(s.image) as im:
            w, h = _resized(im.size, resolution)
        offsets = {((w - resolution) // 2, (h - resolution) // 2)}
        if crop == "random":
            offsets |= {(int(rng.integers(0, w - resolution + 1)),
                         int(rng.integers(0, h - resolution + 1))) for _ in range(crops)}
        for left, top in sorted(offsets):
            out.extend(Item(s, left, top, f) for f in ((False, True) if flip else (False,)))
    return out


def _resized(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def load_pixels(item: Item, resolution: int) -> np.ndarray:
    """The item's pixels as float32 [3, R, R] in [-1, 1] (the VAE's input range)."""
    with Image.open(item.sample.image) as im:
        im = im.convert("RGB")
        im = im.resize(_resized(im.size, resolution), Image.Resampling.LANCZOS)
        im = im.crop((item.left, item.top, item.left + resolution, item.top + resolution))
        if item.flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return x.transpose(2, 0, 1)
