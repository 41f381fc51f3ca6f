"""Bad input to `sdc run`, and faults while it writes: a one-line error naming what was expected,
what was found and what to do, a non-zero exit, and nothing lost or half-written.

Faults are made real where that is cheap: a planted symlink on disk, a kernel file-size limit
(RLIMIT_FSIZE: the write() really fails with EFBIG), a real SIGINT delivered mid-save. A disk
that fills up after N bytes is simulated at the single call that puts bytes on disk
(runtime/png.py `_write`), since no small filesystem can be mounted here.

Cases already covered elsewhere are not repeated: tests/test_run.py (--width 100, --steps,
--guidance, --batch 0, --strength 1.5, an empty --init-image file, ...), tests/test_budget.py
(parse_size basics).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_sdc
from sdc.errors import SdcError
from sdc.runtime import png as png_mod
from sdc.runtime.memory import parse_size
from sdc.runtime.outputs import (OutputError, SaveInterrupted, check_out, output_paths,
                                 save_images)
from sdc.runtime.pipeline import (MAX_INIT_PIXELS, MAX_SEED, GenerateOptions, _init_array,
                                  _open_init_image, _plan, init_image_rgb, min_strength, plan_run,
                                  with_model_defaults)

SCHEDULERS = ("ddim", "pndm", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras", "lms")
FAST = ("--steps", "1", "--width", "64", "--height", "64", "-q")


def one_line_error(proc, *needles) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary files a save could leave (the old fixed name or the new random ones)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".part"))


def parse_a1111(text: str) -> tuple[str, str, dict]:
    """A1111's reading of a `parameters` chunk: the LAST line holds `Key: value` pairs (values
    JSON-quoted when they hold , : or "), the lines before it are the prompt up to a line
    starting `Negative prompt:`, then the negative prompt. Duplicate keys fail the test."""
    kv = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    *lines, last = text.strip().split("\n")
    if len(kv.findall(last)) < 3:  # A1111: not a key-value line after all
        lines, last = lines + [last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields: dict = {}
    for key, value in kv.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        assert key not in fields, f"field {key} twice in {last!r}"
        fields[key] = value
    return "\n".join(prompt), "\n".join(negative), fields


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid-looking PNG header (signature, IHDR with CRC) claiming width x height, with
    almost no data: what a decompression bomb's first bytes look like."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                        8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def opts_for(build, **kw) -> GenerateOptions:
    return GenerateOptions(prompt="x", artifacts=build, **kw)


# 1. output writing ------------------------------------------------------------------------------

def test_planted_symlinks_are_never_written_through(build_fp32, tmp_path):
    """A symlink at the old predictable temp name and one at the final name: both victims keep
    their bytes; the image lands as a regular file; the planted temp-name link is left alone."""
    out = tmp_path / "d"
    out.mkdir()
    victim_tmp, victim_final = tmp_path / "victim-a.txt", tmp_path / "victim-b.txt"
    victim_tmp.write_text("precious a")
    victim_final.write_text("precious b")
    (out / ".img.png.part").symlink_to(victim_tmp)
    (out / "img.png").symlink_to(victim_final)
    run_sdc("run", "x", "-a", build_fp32, *FAST, "--seed", "1", "--out", out / "img.png")
    assert victim_tmp.read_text() == "precious a" and victim_final.read_text() == "precious b"
    img = out / "img.png"
    assert not img.is_symlink() and Image.open(img).size == (64, 64)
    assert (out / ".img.png.part").is_symlink()  # not ours: untouched
    assert sorted(p.name for p in out.iterdir()) == [".img.png.part", "img.png"]


def test_folder_mode_never_replaces_a_dangling_symlink(tmp_path):
    (tmp_path / "5.png").symlink_to(tmp_path / "nowhere")
    assert output_paths(tmp_path, [5, 6]) == [tmp_path / "5-1.png", tmp_path / "6.png"]


def _images(n: int) -> list:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_disk_full_at_image_k_names_what_was_written(tmp_path, monkeypatch):
    """ENOSPC in the middle of image 3 of 3: images 1-2 complete, image 3's older file intact,
    no temp file, and the message lists exactly the two written paths and the unwritten seed."""
    images = _images(3)
    texts = [f"p{i}\nSteps: 1, Sampler: DDIM, Seed: {10 + i}" for i in range(3)]
    sizes = [len(png_mod.png_bytes(im, t)) for im, t in zip(images, texts)]
    room = [sizes[0] + sizes[1] + sizes[2] // 2]  # the disk fills up halfway through image 3
    real_write = png_mod._write

    def filling_write(fd, data):
        n = min(len(data), 4096, room[0])  # short writes too, as a kernel may do
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        room[0] -= n
        return real_write(fd, data[:n])

    monkeypatch.setattr(png_mod, "_write", filling_write)
    paths = output_paths(tmp_path / "a.png", [10, 11, 12])
    paths[2].write_bytes(b"an earlier run's image")
    with pytest.raises(OutputError) as err:
        save_images(images, paths, texts, seeds=[10, 11, 12])
    msg = str(err.value)
    assert "image 3 of 3" in msg and os.strerror(errno.ENOSPC) in msg and "free some disk" in msg
    assert f"wrote 2 of 3 image(s): {paths[0]}, {paths[1]};" in msg
    assert "not written: seed(s) 12" in msg
    assert leftovers(tmp_path) == []
    assert paths[2].read_bytes() == b"an earlier run's image"  # nothing lost
    for p, t in zip(paths[:2], texts):
        assert Image.open(p).text["parameters"] == t  # complete, not truncated


def test_file_size_limit_through_the_cli(build_fp32, tmp_path):
    """A real kernel refusal (RLIMIT_FSIZE -> EFBIG), found only when the first image is
    written: one line, exit 2, no temp file, and the folder the run would have created is gone."""
    import resource

    out = tmp_path / "new" / "sub"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))

    cmd = [sys.executable, "-m", "sdc.cli.main", "run", "x", "-a", str(build_fp32), *FAST,
           "--seed", "7", "--batch", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    line = one_line_error(proc, "image 1 of 2", os.strerror(errno.EFBIG),
                          "none of the 2 image(s) was written",
                          "not written: seed(s) 7 to 8 (--seed 7 --batch 2)")
    assert "nothing was written" not in line
    assert proc.returncode == 2 and proc.stdout == ""
    assert not (tmp_path / "new").exists()


def test_sigint_while_saving_reports_the_written_images(build_fp32, tmp_path, monkeypatch,
                                                        capsys):
    """The real CLI in-process; a real SIGINT arrives while image 2 of 3 is being written."""
    from sdc.cli.main import main

    from sdc.runtime import outputs

    real_atomic, real_write = outputs.write_atomic, png_mod._write
    images = []

    def atomic(*args, **kw):
        images.append(args[0])
        return real_atomic(*args, **kw)

    def write(fd, data):
        if len(images) == 2:  # the second image's bytes: a real signal, the CLI's real handler
            os.kill(os.getpid(), signal.SIGINT)
        return real_write(fd, data)

    monkeypatch.setattr(outputs, "write_atomic", atomic)
    monkeypatch.setattr(png_mod, "_write", write)
    out = tmp_path / "b.png"
    with pytest.raises(SystemExit) as ex:
        main(["run", "x", "-a", str(build_fp32), *FAST, "--seed", "21", "--batch", "3",
              "--out", str(out)])
    cap = capsys.readouterr()
    assert ex.value.code == 130
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    first = tmp_path / "b-1.png"
    assert lines == [f"error: interrupted while saving; wrote 1 of 3 image(s): {first}; not "
                     "written: seed(s) 22 to 23 (--seed 22 --batch 2)"], cap.err
    assert cap.out.split() == [str(first)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-1.png"]


def test_interrupt_swallowed_before_saving_writes_nothing(tmp_path):
    """The CLI's handler sets `cancel` even when a gc callback swallowed the KeyboardInterrupt."""
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SaveInterrupted, match="none of the 2 image"):
        save_images(_images(2), [tmp_path / "o" / "1.png", tmp_path / "o" / "2.png"], ["a", "b"],
                    seeds=[1, 2], cancel=cancel)
    assert SaveInterrupted.exit_code == 130
    assert not (tmp_path / "o").exists()


def test_unwritable_out_is_refused_before_any_work(build_fp32, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(run_sdc("run", "x", "-a", build_fp32, "--out", blocker / "sub" / "x.png",
                           check=False), "is a file, expected a folder")
    (tmp_path / "x.png").mkdir()
    with pytest.raises(SdcError, match="is a folder, expected a .png file name"):
        check_out(tmp_path / "x.png", 1)
    # a refused run creates nothing, not even the --out folder
    one_line_error(run_sdc("run", "x", "-a", build_fp32, "--width", "0", "--out",
                           tmp_path / "fresh" / "imgs", check=False), "--width 0")
    assert not (tmp_path / "fresh").exists()


# 2. --vram-budget ------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["inf", "nan", "-1G", "0", "0GiB", "1e30GiB", "4parsecs",
                                  "1_0G", "1e3", "0.1", "1025TiB", "9" * 40])
def test_budget_forms_refused(text):
    with pytest.raises(SdcError, match="expected a positive size such as 4GiB.*to 1024TiB"):
        parse_size(text)


def test_budget_garbage_through_the_cli(build_fp32):
    for text in ("inf", "1e30GiB"):
        one_line_error(run_sdc("run", "x", "-a", build_fp32, "--plan", "--vram-budget", text,
                               check=False), f"--vram-budget {text}: expected a positive size")


@pytest.mark.parametrize("budget", [0, -5, True, 2**60, 1.5])
def test_budget_from_the_python_api_refused(build_fp32, budget):
    with pytest.raises(SdcError, match="expected a positive size"):
        plan_run(opts_for(build_fp32, vram_budget=budget))


def test_reported_smallest_budget_is_itself_accepted(build_fp32):
    proc = run_sdc("run", "x", "-a", build_fp32, "--plan", "--vram-budget", "1", check=False)
    line = one_line_error(proc, "no plan fits", "--vram-budget 1 byte:")
    need = int(re.search(r"the smallest budget that fits .* is (\d+) MiB", line).group(1))
    assert f"give --vram-budget {need}MiB or more" in line
    ok = run_sdc("run", "x", "-a", build_fp32, "--plan", "--vram-budget", f"{need}MiB")
    assert ok.returncode == 0 and f"budget      {need} MiB" in ok.stdout
    # and it is the smallest whole MiB: one less is refused
    one_line_error(run_sdc("run", "x", "-a", build_fp32, "--plan", "--vram-budget",
                           f"{need - 1}MiB", check=False), "no plan fits")


# 3. sizes ------------------------------------------------------------------------------------

def test_absurd_size_is_refused_from_the_plan(build_fp32, tmp_path):
    """A real run (not --plan): refused before any session loads, naming the memory limit."""
    proc = run_sdc("run", "x", "-a", build_fp32, "--width", "65536", "--height", "65536",
                   "--out", tmp_path / "o.png", check=False)
    one_line_error(proc, "65536x65536, batch 1: the planned peak", "of memory, the most a run "
                   "can hold", "lower --width/--height/--batch")
    assert not (tmp_path / "o.png").exists()
    one_line_error(run_sdc("run", "x", "-a", build_fp32, "--batch", "10000", "--out",
                           tmp_path / "many", check=False),
                   "--batch 10000: expected an integer from 1 to 64")


@pytest.mark.parametrize("kw,needle", [
    ({"width": 0}, "--width 0: expected a positive multiple of"),
    ({"height": -16}, "--height -16: expected a positive multiple of"),
    ({"width": 131072}, "up to 65536"),
    ({"height": 10**400}, "--height"),  # would overflow the planner's float arithmetic
])
def test_bad_sizes(build_fp32, kw, needle):
    with pytest.raises(SdcError, match=re.escape(needle)):
        plan_run(opts_for(build_fp32, **kw))


def test_absurd_size_without_a_memory_profile(build_fp32, monkeypatch):
    """Older builds have no profile: the arrays the run must hold are checked instead."""
    from sdc.runtime import memory
    from sdc.runtime.manifest import load_manifest

    monkeypatch.setattr(memory, "memory_limit_bytes", lambda: 8 * 2**30)
    manifest = dict(load_manifest(build_fp32))
    manifest.pop("memory_profile", None)
    opts = with_model_defaults(opts_for(build_fp32), manifest)
    with pytest.raises(SdcError, match="more than this machine's 8.00 GiB of memory"):
        _plan(opts, manifest, 65536, 65536)
    assert _plan(opts, manifest, 64, 64) is None


# 4. img2img ------------------------------------------------------------------------------------

@pytest.fixture
def gray_png(tmp_path) -> Path:
    Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "gray.png")
    return tmp_path / "gray.png"


def test_strength_leaving_no_step_is_refused_for_every_scheduler(build_fp32, gray_png):
    messages = set()
    for name in SCHEDULERS:
        with pytest.raises(SdcError) as err:
            plan_run(opts_for(build_fp32, init_image=gray_png, strength=0.01, steps=10,
                              scheduler=name))
        messages.add(str(err.value))
    assert messages == {"--strength 0.01: with --steps 10 it leaves no denoising step "
                        "(int(10 x 0.01) = 0); expected --strength 0.1 or more for 10 steps, or "
                        "more --steps"}
    # pndm is the scheduler that used to run anyway (its schedule has one step more)
    one_line_error(run_sdc("run", "x", "-a", build_fp32, "--init-image", gray_png, "--strength",
                           "0.01", "--steps", "10", "--scheduler", "pndm", "--out",
                           gray_png.parent / "o.png", check=False),
                   "expected --strength 0.1 or more")


def test_minimum_strength_is_exact_and_accepted(build_fp32, gray_png):
    for steps in range(1, 1001):
        s = min_strength(steps)
        assert int(steps * s) >= 1 and int(steps * round(s - 0.001, 3)) == 0, steps
    line = one_line_error(run_sdc("run", "x", "-a", build_fp32, "--init-image", gray_png,
                                  "--strength", "0.3", "--steps", "3", "--plan", check=False))
    least = re.search(r"expected --strength (\S+) or more", line).group(1)
    assert least == "0.334"
    run_sdc("run", "x", "-a", build_fp32, "--init-image", gray_png, "--strength", least,
            "--steps", "3", "--plan")


def test_decompression_bomb_refused_from_its_header(build_fp32, tmp_path):
    bomb = png_claiming(tmp_path / "bomb.png", 50000, 50000)
    proc = run_sdc("run", "x", "-a", build_fp32, "--init-image", bomb, "--out",
                   tmp_path / "o.png", check=False)
    one_line_error(proc, "2,500,000,000 pixels", f"{MAX_INIT_PIXELS:,}-pixel limit")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("w,h", [(10000, 10000), (9000, 8000)])
def test_huge_init_image_refused_without_pil_warning(tmp_path, w, h):
    """10000² is above PIL's warning threshold (89 MP) but under its error (179 MP): no
    warning line on stderr, our one-line refusal instead."""
    path = png_claiming(tmp_path / "big.png", w, h)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with pytest.raises(SdcError, match=f"{w}x{h} is {w * h:,} pixels, over the "):
            _open_init_image(path)


def test_not_an_image(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, not a picture")
    for value, needle in ((tmp_path / "notes.txt", "cannot read it as an image"),
                          (tmp_path, "is a folder"), (tmp_path / "missing.png", "file not found")):
        with pytest.raises(SdcError, match=needle):
            _open_init_image(value)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png", compress_level=0)
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])  # header fine, data cut
    with _open_init_image(tmp_path / "cut.png") as img:
        with pytest.raises(SdcError, match="cannot decode it"):
            _init_array(img, tmp_path / "cut.png", 64, 64)


def _mode_cases():
    mid16 = np.full((4, 4), 32768, np.uint16)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([100, 150, 200] + [0, 0, 0] * 255)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 1  # palette index 1 is transparent
    la = Image.merge("LA", (Image.new("L", (4, 4), 100),
                            Image.fromarray(np.array([[0, 255, 255, 255]] * 4, np.uint8))))
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 128))  # 50 % black over white
    return [
        ("I;16", Image.fromarray(mid16), {(1, 1): (128, 128, 128)}),
        ("I", Image.fromarray(mid16.astype(np.int32)), {(1, 1): (128, 128, 128)}),
        ("F 0..1", Image.fromarray(np.full((4, 4), 0.5, np.float32)), {(1, 1): (128, 128, 128)}),
        ("F 0..255", Image.fromarray(np.full((4, 4), 200.0, np.float32)), {(1, 1): (200,) * 3}),
        ("LA", la, {(0, 0): (255, 255, 255), (1, 0): (100, 100, 100)}),
        ("P+transparency", p, {(0, 0): (255, 255, 255), (1, 1): (100, 150, 200)}),
        ("RGBA", rgba, {(1, 1): (127, 127, 127)}),
        ("CMYK", Image.new("CMYK", (4, 4), (0, 255, 255, 0)), {(1, 1): (255, 0, 0)}),
        ("L", Image.new("L", (4, 4), 77), {(1, 1): (77, 77, 77)}),
    ]


@pytest.mark.parametrize("name,img,pixels", _mode_cases(), ids=[c[0] for c in _mode_cases()])
def test_init_image_modes_convert_to_sane_rgb(name, img, pixels):
    rgb = init_image_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == img.size
    for xy, want in pixels.items():
        got = rgb.getpixel(xy)
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1, (name, xy, got, want)


def test_16bit_init_image_runs_like_its_8bit_twin(build_fp32, tmp_path):
    """Through the CLI: a 16-bit mid-grey PNG gives exactly the image of an 8-bit 128-grey one
    (it used to be read as white)."""
    Image.fromarray(np.full((64, 64), 32896, np.uint16)).save(tmp_path / "g16.png")  # 128 x 257
    Image.new("L", (64, 64), 128).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    common = ["-a", build_fp32, "--steps", "2", "--strength", "0.5", "--seed", "4", "-q"]
    run_sdc("run", "x", *common, "--init-image", tmp_path / "g16.png", "--out", tmp_path / "a.png")
    run_sdc("run", "x", *common, "--init-image", tmp_path / "g8.png", "--out", tmp_path / "b.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")),
                                  np.asarray(Image.open(tmp_path / "b.png")))


# 5. seeds --------------------------------------------------------------------------------------

def test_seed_range_and_batch_overflow(build_fp32, tmp_path):
    out = ("--out", tmp_path / "o")
    one_line_error(run_sdc("run", "x", "-a", build_fp32, "--seed", str(MAX_SEED), "--batch", "2",
                           *out, check=False), f"last seed {MAX_SEED + 1} is above {MAX_SEED}",
                   f"give --seed {MAX_SEED - 1} or lower")
    one_line_error(run_sdc("run", "x", "-a", build_fp32, "--seed", "-1", *out, check=False),
                   f"--seed -1: expected an integer from 0 to {MAX_SEED}")
    one_line_error(run_sdc("run", "x", "-a", build_fp32, "--seed", "12abc", *out, check=False),
                   "--seed 12abc: expected an integer")
    assert not (tmp_path / "o").exists()
    for bad in (MAX_SEED + 1, 2**64, -(2**63)):
        with pytest.raises(SdcError, match="--seed"):
            plan_run(opts_for(build_fp32, seed=bad))


def test_last_seed_of_a_batch_at_the_top_reproduces_alone(build_fp32, tmp_path):
    top = MAX_SEED
    run_sdc("run", "x", "-a", build_fp32, *FAST, "--seed", str(top - 1), "--batch", "2",
            "--scheduler", "euler-a", "--out", tmp_path / "batch")
    run_sdc("run", "x", "-a", build_fp32, *FAST, "--seed", str(top), "--scheduler", "euler-a",
            "--out", tmp_path / "alone")
    second = Image.open(tmp_path / "batch" / f"{top}.png")
    assert parse_a1111(second.text["parameters"])[2]["Seed"] == str(top)
    np.testing.assert_array_equal(np.asarray(second),
                                  np.asarray(Image.open(tmp_path / "alone" / f"{top}.png")))


# 6. PNG parameters ------------------------------------------------------------------------------

def test_prompt_cannot_inject_fields_through_the_cli(build_fp32, tmp_path):
    prompt = "Negative prompt: a cat\nSteps: 99, Seed: 1, CFG scale: 30\n"
    negative = "ugly\nSize: 9x9, Sampler: Euler\r\nModel: fake"
    out = tmp_path / "p.png"
    run_sdc("run", prompt, "-a", build_fp32, *FAST, "--seed", "5", "--guidance", "6",
            "--negative", negative, "--out", out)
    got_prompt, got_negative, fields = parse_a1111(Image.open(out).text["parameters"])
    assert got_prompt == "negative prompt: a cat Steps: 99, Seed: 1, CFG scale: 30"
    assert got_negative == "ugly Size: 9x9, Sampler: Euler Model: fake"
    assert (fields["Steps"], fields["Seed"], fields["CFG scale"], fields["Size"]) == \
        ("1", "5", "6.0", "64x64")
    assert fields["Sampler"] != "Euler" and fields["Model"] != "fake"


def test_flattened_prompt_conditions_the_model_identically(build_fp32):
    """Flattening is lossless for the image: the build's CLIP tokenizer gives the same ids."""
    from sdc.runtime.tokenizer import PromptTokenizer

    tok = PromptTokenizer(Path(build_fp32) / "tokenizer")
    typed = ["Negative prompt: a\n\tcat\u2028 on  a mat\n", " Red\r\nsquare "]
    recorded = [png_mod.flat_prompt(t) for t in typed]
    recorded[0] = "n" + recorded[0][1:]  # what a1111_parameters writes for this prompt
    np.testing.assert_array_equal(tok(typed).ids, tok(recorded).ids)


def test_quoted_values_cannot_end_a_field():
    text = png_mod.a1111_parameters({
        "prompt": "p", "negative": "", "steps": 3, "scheduler": "ddim", "guidance": 7.5,
        "seed": 42, "width": 64, "height": 64, "model": 'evil", Seed: 7\nSteps: 1',
        "model_hash": "abc", "loras": [('x", Seed: 8', 0.5)], "version": "sdc 0"})
    assert len(text.split("\n")) == 2 and len(text.splitlines()) == 2
    prompt, negative, fields = parse_a1111(text)
    assert (prompt, negative) == ("p", "")
    assert fields["Seed"] == "42" and fields["Steps"] == "3"
    assert fields["Model"] == 'evil", Seed: 7\nSteps: 1'
    assert fields["Lora weights"] == 'x", Seed: 8: 0.5'
