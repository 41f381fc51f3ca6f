"""PNG output with A1111's `parameters` text chunk, the de-facto metadata format that
A1111, ComfyUI and Civitai read back ("PNG info"): prompt, then `Negative prompt: ...`, then one
line of `Key: value` pairs.

Files are written atomically: the PNG goes to a temporary file created exclusively (O_EXCL, random
name) next to its destination, is fsynced, then os.replace()d over the final name. Nothing is ever
opened by a predictable name, so a symlink planted there is never followed; os.replace swaps
directory entries, so a symlink at the final name is replaced, not written through.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

# sdc scheduler name -> the sampler name A1111 writes (PLMS is A1111's name for SD's PNDM).
A1111_SAMPLERS = {"ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler-a": "Euler a",
                  "dpmpp-2m": "DPM++ 2M", "dpmpp-2m-karras": "DPM++ 2M Karras", "lms": "LMS"}
NEGATIVE = "Negative prompt:"


def a1111_parameters(p: dict) -> str:
    """p: prompt, negative, steps, scheduler, guidance, seed, width, height, model, model_hash,
    loras (list of (name, weight)), strength (img2img or None), version.

    A1111 reads the LAST line as the key-value line and every line before it as prompt, up to a
    line starting with `Negative prompt:`. So the prompt and negative prompt are written on one
    line each (whitespace flattened, see `flat_prompt`) and every value on the key-value line
    that could end a field or a line is JSON-quoted, as A1111 itself quotes: nothing a user types
    can add, end or shadow a field."""
    fields = [
        ("Steps", p["steps"]), ("Sampler", A1111_SAMPLERS.get(p["scheduler"], p["scheduler"])),
        ("CFG scale", p["guidance"]), ("Seed", p["seed"]), ("Size", f"{p['width']}x{p['height']}"),
    ]
    if p.get("model_hash"):
        fields.append(("Model hash", p["model_hash"]))
    fields.append(("Model", p["model"]))
    if p.get("strength") is not None:
        fields.append(("Denoising strength", p["strength"]))
    if p.get("loras"):
        fields.append(("Lora weights", ", ".join(f"{n}: {w}" for n, w in p["loras"])))
    if p.get("truncated"):
        fields.append(("Prompt truncated", "yes"))
    fields.append(("Version", p["version"]))
    text = flat_prompt(p["prompt"])
    if text.startswith(NEGATIVE):
        # A1111 would read this prompt as the negative one. CLIP tokenizers lowercase (every
        # SD1.x tokenizer does), so the lowercased word conditions the model identically.
        text = text[0].lower() + text[1:]
    negative = flat_prompt(p.get("negative") or "")
    if negative:
        text += f"\n{NEGATIVE} {negative}"
    return text + "\n" + ", ".join(f"{k}: {_quote(v)}" for k, v in fields)


def flat_prompt(text: str) -> str:
    """A prompt on one line: each whitespace run (newlines, tabs, U+2028, ...) becomes one space.
    Lossless for the image: CLIP's tokenizer normalises whitespace the same way (`\\s+` -> " ",
    then strips), so the recorded prompt reproduces the image the typed one made."""
    return " ".join(str(text).split())


def _quote(value) -> str:
    s = str(value)
    if not any(c in s for c in ',:"\n\r') and s == s.strip() and s.isprintable():
        return s
    # JSON, as A1111 quotes (and json.loads back); the line separators JSON leaves raw with
    # ensure_ascii=False are escaped too, so the value stays on its line for every reader
    q = json.dumps(s, ensure_ascii=False)
    return q.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def png_bytes(image, parameters: str) -> bytes:
    """The encoded PNG, in memory: encoding fails (if it does) before any file exists."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@contextmanager
def signals_deferred():
    """SIGINT/SIGTERM held back (delivered on exit) while a few calls must happen together:
    creating a temp file and remembering its name, or renaming a file into place and recording
    that it was written. An interrupt between the two would leak the file, or report a written
    image as unwritten."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no masks; the window is tiny anyway
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# The call that puts bytes on disk: partial writes are continued, errors (ENOSPC, EIO, EFBIG)
# raised. A module attribute so tests can fake a disk that fills up mid-file.
_write = os.write
_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
          | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.part")


def write_atomic(path: Path, data: bytes, committed: Callable[[Path], None] | None = None) -> Path:
    """Write `data` to `path` all or nothing; `committed(path)` runs in the same signal-free
    window as the rename, so a caller's record of what was written is exact. On any failure
    (OSError, KeyboardInterrupt) the temp file is removed and the exception re-raised; `path`
    is then as it was."""
    path = Path(path)
    fd = tmp = None
    try:
        with signals_deferred():
            for _ in range(16):  # 64 random bits: a collision means someone is guessing
                name = _temp_name(path)
                try:
                    # mode 0o666 & ~umask, as any new file; O_EXCL fails on anything existing,
                    # a planted symlink included
                    fd = os.open(name, _FLAGS, 0o666)
                except FileExistsError:
                    continue
                tmp = name  # ours from here on: removed on any failure below
                break
            else:
                raise FileExistsError(f"cannot create a temporary file next to {path}")
        view = memoryview(data)
        while view:
            view = view[_write(fd, view):]
        os.fsync(fd)
        fd_, fd = fd, None
        os.close(fd_)  # NFS may report ENOSPC only here
        with signals_deferred():
            os.replace(tmp, path)
            tmp = None
            if committed is not None:
                committed(path)
    except BaseException:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    return path


def fsync_dir(folder: Path) -> None:
    """Make the renames durable (the directory entries), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_png(image, path: Path, parameters: str) -> Path:
    """One PNG with its `parameters` chunk, written atomically (never half-written, never
    through a symlink)."""
    path = Path(path)
    write_atomic(path, png_bytes(image, parameters))
    fsync_dir(path.parent)
    return path
