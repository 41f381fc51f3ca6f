"""`sdc serve` driven over HTTP by `webuiapi`, the AUTOMATIC1111 API client written by others, and
by plain requests: every image equal, bit for bit, to its `sdc run` twin (same seed, sampler, size,
LoRA tags); model switching, LoRA listing, interrupt, cancellation on disconnect, the bounded
queue under concurrent load, refusals as one-line 422s, auth, and memory over adapter switches.

The server is a real subprocess on a free 127.0.0.1 port (tests/serve_server.py), always stopped.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import assert_cli_torch_free, run_sdc
from lora_files import make_peft_lora, to_kohya
from serve_server import running_server

SIZE = ["--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def lora_dir(tiny_folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-loras")
    made = tmp_path_factory.mktemp("serve-lora-src")
    for name, seed, conv in (("alpha", 21, False), ("beta", 22, False), ("gamma", 23, False),
                             ("locon", 24, True)):
        shutil.copy(make_peft_lora(tiny_folder, made / name, seed=seed, conv=conv, scale=1.0),
                    d / f"{name}.safetensors")
    meta = {"modelspec.trigger_phrase": "sks seal"}
    sub = d / "styles"
    sub.mkdir()
    to_kohya(d / "beta.safetensors", sub / "seal-style.safetensors", metadata=meta)
    return d


@pytest.fixture(scope="module")
def server(build_fp32, lora_dir):
    with running_server(build_fp32, lora_dir, "--max-queue", "16") as srv:
        yield srv


def _api(srv):
    import webuiapi

    return webuiapi.WebUIApi(host="127.0.0.1", port=srv.port)


def _png(path_or_img) -> np.ndarray:
    img = path_or_img if isinstance(path_or_img, Image.Image) else Image.open(path_or_img)
    return np.asarray(img.convert("RGB"))


def _twins(tmp_path, build, prompt, lora_dir, *args, batch: int = 1) -> list[np.ndarray]:
    """The same images from `sdc run` (a separate process, a one-shot Engine)."""
    out = tmp_path / f"twin-{abs(hash((prompt, args, batch)))}.png"
    run_sdc("run", prompt, "-a", build, "--lora-dir", lora_dir, "--out", out, "--quiet",
            "--batch", batch, *args)
    paths = [out] if batch == 1 else [out.with_name(f"{out.stem}-{i + 1}.png")
                                      for i in range(batch)]
    return [_png(p) for p in paths]


def _twin(tmp_path, build, prompt, lora_dir, *args) -> np.ndarray:
    return _twins(tmp_path, build, prompt, lora_dir, *args)[0]


def _post(srv, route, body, **kw):
    return requests.post(f"{srv.url}/sdapi/v1/{route}", json=body, timeout=kw.pop("timeout", 120),
                         **kw)


def _metric(srv, name: str) -> float:
    text = requests.get(srv.url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_webuiapi_txt2img_matches_sdc_run(server, build_fp32, lora_dir, tmp_path):
    api = _api(server)
    cases = [("a red circle", None, "Euler a", "euler-a"),
             ("a seal <lora:alpha:0.8>", None, "DPM++ 2M", "dpmpp-2m"),
             ("a seal <lora:locon:0.5>", None, "Euler", "euler"),  # LoCon: a session, not slots
             ("a seal <lora:alpha:0.8>", None, "DPM++ 2M", "dpmpp-2m")]  # cached again
    for prompt, _, a1111, sdc in cases:
        r = api.txt2img(prompt=prompt, seed=5, steps=6, cfg_scale=7, width=64, height=64,
                        sampler_name=a1111)
        twin = _twin(tmp_path, build_fp32, prompt, lora_dir, "--seed", "5", "--steps", "6",
                     "--guidance", "7", "--scheduler", sdc, *SIZE)
        np.testing.assert_array_equal(_png(r.image), twin, err_msg=prompt)
        assert r.info["all_seeds"] == [5] and r.info["sampler_name"] == a1111
        text = r.info["infotexts"][0]
        assert f"Sampler: {a1111}," in text and "Seed: 5," in text and prompt.split()[0] in text
        assert r.image.info.get("parameters") == text  # the PNG carries the infotext
    assert _metric(server, "sdc_adapter_cache_hits_total") >= 1
    assert _metric(server, "sdc_adapter_sessions_total") >= 1  # the LoCon adapter


def test_adapters_a_b_a_and_batches(server, build_fp32, lora_dir, tmp_path):
    """A -> B -> A through the warm server gives A's image bit for bit; n_iter x batch_size seeds
    run on from the request's seed as A1111's do."""
    body = {"prompt": "a seal <lora:alpha:0.8>", "seed": 40, "steps": 5, "width": 64,
            "height": 64, "sampler_name": "Euler a", "batch_size": 2, "n_iter": 2}
    first = _post(server, "txt2img", body).json()
    _post(server, "txt2img", {**body, "prompt": "a seal <lora:beta>", "n_iter": 1})
    again = _post(server, "txt2img", body).json()
    assert first["images"] == again["images"] and len(first["images"]) == 4
    assert json.loads(first["info"])["all_seeds"] == [40, 41, 42, 43]
    twins = _twins(tmp_path, build_fp32, body["prompt"], lora_dir, "--seed", "42", "--steps",
                   "5", "--scheduler", "euler-a", *SIZE, batch=2)
    for got, twin in zip(first["images"][2:], twins):
        np.testing.assert_array_equal(_png(io.BytesIO(base64.b64decode(got))), twin)
    binds = _metric(server, "sdc_adapter_binds_total")
    sessions = _metric(server, "sdc_sessions_created_total")
    _post(server, "txt2img", {**body, "prompt": "a seal <lora:beta>", "n_iter": 1})
    _post(server, "txt2img", {**body, "n_iter": 1})
    # two switches between cached adapters: bound to the resident sessions, none created
    assert _metric(server, "sdc_sessions_created_total") == sessions
    assert _metric(server, "sdc_adapter_binds_total") >= binds + 2


def test_webuiapi_img2img_matches_sdc_run(server, build_fp32, lora_dir, tmp_path):
    api = _api(server)
    init = Image.fromarray((np.indices((64, 64)).sum(0) % 64 * 4).astype(np.uint8)).convert("RGB")
    init.save(tmp_path / "init.png")
    r = api.img2img(images=[init], prompt="a blue square", seed=3, steps=8, cfg_scale=5,
                    width=64, height=64, denoising_strength=0.6, sampler_name="DDIM", eta=0)
    twin = _twin(tmp_path, build_fp32, "a blue square", lora_dir, "--seed", "3", "--steps", "8",
                 "--guidance", "5", "--scheduler", "ddim", "--init-image", tmp_path / "init.png",
                 "--strength", "0.6", *SIZE)
    np.testing.assert_array_equal(_png(r.image), twin)
    assert "Denoising strength: 0.6" in r.info["infotexts"][0]


def test_models_options_switch_and_loras(build_fp32, builtin_build, lora_dir, tmp_path):
    builds = tmp_path / "builds"
    builds.mkdir()
    for b in (build_fp32, builtin_build):
        (builds / b.name).symlink_to(b, target_is_directory=True)
    with running_server(builds, lora_dir) as srv:
        api = _api(srv)
        titles = api.util_get_model_names()
        assert len(titles) == 2 and all(" [" in t for t in titles)
        other = next(t for t in titles if t.startswith(builtin_build.name))
        api.set_options({"sd_model_checkpoint": other})
        assert api.get_options()["sd_model_checkpoint"] == other
        r = api.txt2img(prompt="a red circle on a blue background", seed=1, steps=4, width=64,
                        height=64, sampler_name="Euler a", cfg_scale=3)
        twin = _twin(tmp_path, builtin_build, "a red circle on a blue background", lora_dir,
                     "--seed", "1", "--steps", "4", "--guidance", "3", "--scheduler", "euler-a",
                     *SIZE)
        np.testing.assert_array_equal(_png(r.image), twin)
        assert r.info["sd_model_name"] == builtin_build.name
        loras = {lo["name"]: lo for lo in api.get_loras()}
        assert set(loras) == {"alpha", "beta", "gamma", "locon", "seal-style"}
        assert loras["seal-style"]["triggers"] == ["sks seal"]
        assert loras["seal-style"]["path"] == "styles/seal-style.safetensors"
        bad = requests.post(srv.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
        assert bad.status_code == 422 and "no such model" in bad.json()["detail"]
        assert api.get_options()["sd_model_checkpoint"] == other  # unchanged


def test_interrupt_returns_what_was_reached(server):
    api = _api(server)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("r", api.txt2img(
        prompt="a seal", seed=2, steps=150, width=256, height=256, sampler_name="Euler a")))
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = api.get_progress()["state"]
        if state["sampling_step"] >= 2:
            assert 0 < api.get_progress()["progress"] < 1
            break
        time.sleep(0.05)
    api.interrupt()
    worker.join(timeout=120)
    r = out["r"]
    assert len(r.images) == 1 and r.info["sdc"]["interrupted"] is True
    assert api.get_progress()["state"]["job_count"] == 0


def test_client_disconnect_cancels_its_job(server):
    images = _metric(server, "sdc_images_total")
    body = {"prompt": "a seal", "seed": 2, "steps": 150, "width": 256, "height": 256}
    with pytest.raises(requests.exceptions.ReadTimeout):
        _post(server, "txt2img", body, timeout=1.5)
    deadline = time.monotonic() + 60
    while requests.get(server.url + "/sdapi/v1/progress").json()["state"]["job_count"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _metric(server, "sdc_images_total") == images  # stopped, nothing decoded


@pytest.mark.parametrize("field,value,needle", [
    ("enable_hr", True, "enable_hr=true: hires fix"),
    ("restore_faces", True, "face restoration"),
    ("alwayson_scripts", {"ControlNet": {"args": [1]}}, "alwayson_scripts"),
    ("subseed_strength", 0.5, "variation seeds"),
    ("some_extension_arg", 3, "some_extension_arg=3: an unknown option"),
    ("steps", 10_000, "steps=10000: expected an integer from 1 to 150"),
    ("width", 100_000, "width=100000"),
    ("width", 100, "multiple of"),
    ("n_iter", 17, "n_iter=17"),
    ("sampler_name", "Heun", "sampler_name='Heun'"),
    ("prompt", "x <lora:../etc/passwd:1>", "not a path"),
    ("prompt", "x <lora:nothere:1>", "no LoRA of that name"),
    ("override_settings", {"sd_model_checkpoint": "/etc/passwd"}, "no such model"),
    ("override_settings", {"CLIP_stop_at_last_layers": 2}, "CLIP_stop_at_last_layers"),
    ("seed", "five", "seed='five'"),
    ("seed", 10 ** 30, "seed=1000000000000000000000000000000"),
])
def test_bad_requests_are_one_line_422(server, field, value, needle):
    r = _post(server, "txt2img", {"prompt": "a seal", "steps": 2, "width": 64, "height": 64,
                                  field: value})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert needle in detail and "\n" not in detail and "Traceback" not in r.text


def test_bad_bodies(server):
    r = requests.post(server.url + "/sdapi/v1/txt2img", data=b"{not json",
                      headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not JSON" in r.json()["detail"]
    r = _post(server, "img2img", {"prompt": "x", "init_images": ["%%%"]})
    assert r.status_code == 422 and "base64" in r.json()["detail"]
    r = _post(server, "img2img", {"prompt": "x", "init_images": [base64.b64encode(b"png?").decode()]})
    assert r.status_code == 422 and "image" in r.json()["detail"]
    inf = requests.post(server.url + "/sdapi/v1/txt2img", data=b'{"prompt": "x", "steps": 1e400}',
                        headers={"content-type": "application/json"})
    assert inf.status_code == 422 and "steps=inf" in inf.json()["detail"]
    long_int = requests.post(server.url + "/sdapi/v1/txt2img", data=b'{"seed": ' + b"9" * 5000 + b"}",
                             headers={"content-type": "application/json"})
    assert long_int.status_code == 422 and "too many digits" in long_int.json()["detail"]
    deep = requests.post(server.url + "/sdapi/v1/txt2img", data=b"[" * 200_000,
                         headers={"content-type": "application/json"})
    assert deep.status_code == 422 and "nested too deeply" in deep.json()["detail"]
    big = requests.post(server.url + "/sdapi/v1/txt2img", data=b"{" + b" " * (33 * 2**20) + b"}",
                        headers={"content-type": "application/json"})
    assert big.status_code == 422 and "--max-body" in big.json()["detail"]
    assert requests.get(server.url + "/nope").status_code == 404


def test_load_queue_overflow_nothing_lost(build_fp32, lora_dir, tmp_path):
    """24 concurrent clients over 3 adapters and none against a queue of 3: some are told 503 with
    Retry-After and retry; every request is answered once, each image its `sdc run` twin's."""
    configs = ["a seal", "a seal <lora:alpha:0.7>", "a seal <lora:beta:0.9>",
               "a seal <lora:gamma>"]
    seeds = range(100, 106)
    twins = {}
    for prompt in configs:  # seeds S..S+5 in one run: image i of a batch reproduces alone
        images = _twins(tmp_path, build_fp32, prompt, lora_dir, "--seed", "100", "--steps", "4",
                        "--scheduler", "euler-a", *SIZE, batch=6)
        twins.update({(prompt, s): img for s, img in zip(seeds, images)})
    busy = []

    def client(prompt, seed):
        for _ in range(200):  # bounded retries
            r = _post(server_, "txt2img", {"prompt": prompt, "seed": seed, "steps": 4,
                                           "width": 64, "height": 64, "sampler_name": "Euler a"})
            if r.status_code == 503:
                busy.append(int(r.headers["Retry-After"]))
                time.sleep(0.2)
                continue
            assert r.status_code == 200, r.text
            return prompt, seed, r.json()
        raise AssertionError("still 503 after 200 tries")

    with running_server(build_fp32, lora_dir, "--max-queue", "3") as server_:
        work = [(p, s) for p in configs for s in seeds]
        with ThreadPoolExecutor(max_workers=24) as pool:
            answers = list(pool.map(lambda ps: client(*ps), work))
        assert busy and all(b >= 1 for b in busy)
        assert _metric(server_, "sdc_jobs_total") == len(work)  # none run twice
    assert len(answers) == 24
    for prompt, seed, body in answers:
        assert json.loads(body["info"])["all_seeds"] == [seed]
        got = _png(io.BytesIO(base64.b64decode(body["images"][0])))
        np.testing.assert_array_equal(got, twins[(prompt, seed)], err_msg=f"{prompt} {seed}")


def test_memory_flat_over_100_adapter_switches(build_fp32, lora_dir):
    def rss(pid):
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:")))

    with running_server(build_fp32, lora_dir) as srv:
        marks = {}
        for i in range(1, 101):
            name = "alpha" if i % 2 else "beta"
            r = _post(srv, "txt2img", {"prompt": f"x <lora:{name}:0.8>", "seed": i, "steps": 1,
                                       "width": 64, "height": 64})
            assert r.status_code == 200, r.text
            if i in (10, 100):
                marks[i] = rss(srv.proc.pid)
        assert marks[100] <= marks[10] * 1.02, marks


def test_auth_and_host_safety(build_fp32, tmp_path):
    proc = run_sdc("serve", "-a", build_fp32, "--host", "0.0.0.0", check=False, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "--api-auth" in lines[0], proc.stderr
    with running_server(build_fp32, None, "--api-auth", "ada:s3cret") as srv:
        assert requests.get(srv.url + "/health").status_code == 200  # liveness stays open
        r = requests.get(srv.url + "/sdapi/v1/sd-models")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert requests.get(srv.url + "/sdapi/v1/sd-models", auth=("ada", "wrong")).status_code == 401
        import webuiapi

        api = webuiapi.WebUIApi(host="127.0.0.1", port=srv.port, username="ada",
                                password="s3cret")
        assert len(api.get_sd_models()) == 1
        assert requests.get(srv.url + "/", auth=("ada", "s3cret")).status_code == 200


def test_build_changed_under_a_running_server_is_refused(build_fp32, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(build_fp32, copy)
    with running_server(copy) as srv:
        body = {"prompt": "a seal", "seed": 1, "steps": 2, "width": 64, "height": 64}
        assert _post(srv, "txt2img", body).status_code == 200
        data = copy / "unet" / "model.onnx_data"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        r = _post(srv, "txt2img", body)
        assert r.status_code == 422 and "do not match the manifest" in r.json()["detail"]


def test_serve_stack_is_torch_free(build_fp32):
    """The app (routes, Engine, a request) without torch/diffusers/transformers: what an edge box
    with `sdc[runtime,serve]` runs."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from sdc.serve.app import ServeConfig, create_app\n"
        f"app = create_app(ServeConfig({str(build_fp32)!r}))\n"
        "r = TestClient(app).post('/sdapi/v1/txt2img', json={'prompt': 'x', 'steps': 1, "
        "'width': 64, 'height': 64})\n"
        "assert r.status_code == 200, r.text\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_cli_torch_free(["serve", "--help"])
