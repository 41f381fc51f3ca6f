"""`sdc serve --ray`: the same app on Ray Serve (a local cluster bound to 127.0.0.1, started and
stopped by the test). The single-replica smoke test runs in the default suite; the scale-out
proofs (multiplexing hit rates, a replica killed under load, autoscaling 1 -> 2 -> 1) are marked
`ray` and run by `make test-ray` (a few minutes on 2 cores).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import run_sdc
from lora_files import make_peft_lora
from serve_server import free_port

SIZE = {"width": 64, "height": 64}
STEPS = 24  # ~0.15 s a request here: the load lasts long enough to kill a replica within it
PER_ADAPTER = 20  # requests per adapter: the first misses are a small part of the hit rate


@pytest.fixture(scope="module")
def lora_dir(tiny_folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-loras")
    src = tmp_path_factory.mktemp("ray-lora-src")
    for i, name in enumerate(("a", "b", "c", "d")):
        path = make_peft_lora(tiny_folder, src / name, seed=60 + i, scale=1.0)
        path.rename(d / f"{name}.safetensors")
    return d


@contextlib.contextmanager
def ray_serve(cpus: int = 4):
    """A local Ray cluster and Serve's HTTP proxy, both on 127.0.0.1; always shut down."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="error", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(build, lora_dir, **ray_options):
    from ray import serve

    from sdc.serve.app import ServeConfig
    from sdc.serve.ray_app import RayOptions, application

    cache = ray_options.pop("lora_cache", "2GiB")
    cfg = ServeConfig(build, lora_dir, max_queue=ray_options.pop("max_queue", 8), lora_cache=cache)
    serve.run(application(cfg, RayOptions(**ray_options)), name="sdc", route_prefix="/")


def body(prompt: str, seed: int, steps: int = STEPS) -> dict:
    return {"prompt": prompt, "seed": seed, "steps": steps, "sampler_name": "Euler a", **SIZE}


def image(reply: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))).convert("RGB"))


def twins(tmp_path, build, lora_dir, prompt: str, seed: int, n: int) -> list[np.ndarray]:
    """`sdc run` for seeds seed..seed+n-1 (one process; image i reproduces alone), with one
    onnxruntime thread as each 1-CPU replica runs (another thread count can move a pixel by one
    level)."""
    out = tmp_path / f"twin-{abs(hash(prompt))}.png"
    run_sdc("run", prompt, "-a", build, "--lora-dir", lora_dir, "--seed", seed, "--batch", n,
            "--steps", STEPS, "--scheduler", "euler-a", "--width", 64, "--height", 64, "--out", out,
            "--threads", 1, "--quiet")
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{i + 1}.png") for i in range(n)]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def post_until_answered(url: str, payload: dict, tries: int = 300) -> dict:
    """A client that retries 503s (queue full, or a replica lost mid-request) and dropped
    connections, bounded in tries."""
    for _ in range(tries):
        try:
            r = requests.post(url + "/sdapi/v1/txt2img", json=payload, timeout=120)
        except requests.ConnectionError:
            time.sleep(0.2)
            continue
        if r.status_code == 503:
            time.sleep(min(float(r.headers.get("Retry-After", 1)), 1.0))
            continue
        assert r.status_code == 200, r.text
        return r.json()
    raise AssertionError(f"not answered after {tries} tries: {payload}")


def test_ray_single_replica_smoke(build_fp32, lora_dir, tmp_path):
    """One engine replica behind the ingress: the image is `sdc run`'s, the adapter set is a miss
    then a hit on that replica, and a bad request is the ingress' one-line 422."""
    want = twins(tmp_path, build_fp32, lora_dir, "a seal <lora:a:0.8>", 7, 1)[0]
    with ray_serve() as url:
        deploy(build_fp32, lora_dir, replicas=1)
        first = post_until_answered(url, body("a seal <lora:a:0.8>", 7))
        again = post_until_answered(url, body("a seal <lora:a:0.8>", 7))
        np.testing.assert_array_equal(image(first), want)
        assert first["images"] == again["images"]
        s1, s2 = (json.loads(r["info"])["sdc"] for r in (first, again))
        assert (s1["adapter_cache"], s2["adapter_cache"]) == ("miss", "hit")
        assert s1["replica"] == s2["replica"]
        bad = requests.post(url + "/sdapi/v1/txt2img", json={**body("x", 1), "enable_hr": True})
        assert bad.status_code == 422 and "hires fix" in bad.json()["detail"]
        assert requests.get(url + "/health").json()["ray"] is True
        assert len(requests.get(url + "/sdapi/v1/sd-models").json()) == 1


def _load(url, work, clients=8):
    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(lambda w: (w, post_until_answered(url, body(*w))), work))


def _set_nbytes(build, lora_dir) -> int:
    from sdc.fusion.fuse import LoraSpec
    from sdc.runtime.engine import Engine

    return Engine(build).adapter_set([LoraSpec(lora_dir / "a.safetensors", 0.8)],
                                     lambda m: None).nbytes


@pytest.mark.ray
def test_ray_multiplexing_fault_and_hit_rates(build_fp32, lora_dir, tmp_path):
    """2 replicas, 80 requests over 4 adapters from 8 concurrent clients, each replica's cache
    holding 2 adapter sets: routed by adapter set, most requests find theirs cached; routed
    anywhere, far fewer. A replica is killed mid-load: every request is answered once, each image
    equal to its `sdc run` twin."""
    from ray import serve

    import random

    prompts = [f"a seal <lora:{n}:0.8>" for n in "abcd"]
    work = [(p, 200 + i) for i in range(PER_ADAPTER) for p in prompts]
    random.Random(0).shuffle(work)  # adapters in no particular order, as clients send them
    want = {}
    for p in prompts:
        want.update({(p, 200 + i): img for i, img in
                     enumerate(twins(tmp_path, build_fp32, lora_dir, p, 200, PER_ADAPTER))})
    cache = str(int(_set_nbytes(build_fp32, lora_dir) * 2.5))
    rates = {}
    for name, multiplex, fault in (("multiplexed", True, False), ("any replica", False, False),
                                   ("multiplexed, a replica killed", True, True)):
        with ray_serve() as url:
            deploy(build_fp32, lora_dir, replicas=2, multiplex=multiplex, lora_cache=cache,
                   adapters_per_replica=2)
            killed = {}
            if fault:  # kill one engine replica's process mid-load; Ray replaces it
                def kill_one():
                    time.sleep(1.5)
                    engine = serve.get_deployment_handle("engine", app_name="sdc")
                    killed["pid"] = engine.stats.remote().result(timeout_s=60)["pid"]
                    os.kill(killed["pid"], signal.SIGKILL)
                    killed["at"] = time.monotonic()

                threading.Thread(target=kill_one, daemon=True).start()
            t0 = time.monotonic()
            answers = _load(url, work)
            seconds = time.monotonic() - t0
        keys = [w for w, _ in answers]
        assert sorted(keys) == sorted(work)  # every request answered exactly once
        for w, reply in answers:
            assert json.loads(reply["info"])["all_seeds"] == [w[1]]
            np.testing.assert_array_equal(image(reply), want[w], err_msg=str(w))
        results = [json.loads(r["info"])["sdc"]["adapter_cache"] for _, r in answers]
        replicas = {json.loads(r["info"])["sdc"]["replica"] for _, r in answers}
        rates[name] = results.count("hit") / len(results)
        print(f"{name}: hit rate {rates[name]:.2f} over {len(results)} requests, "
              f"{len(replicas)} replicas answered, {seconds:.1f} s")
        if fault:  # killed while requests were still being answered
            assert killed.get("pid") and killed["at"] < t0 + seconds and len(replicas) >= 2
    assert rates["multiplexed"] >= rates["any replica"] + 0.2, rates


@pytest.mark.ray
def test_ray_autoscaling_up_and_down(build_fp32, lora_dir):
    from ray import serve

    def running() -> int:
        dep = serve.status().applications["sdc"].deployments["engine"]
        return dep.replica_states.get("RUNNING", 0)

    with ray_serve() as url:
        deploy(build_fp32, lora_dir, autoscale=(1, 2), target_ongoing=1, upscale_delay=1,
               downscale_delay=5, look_back=2, health_period=2)
        assert running() == 1
        done = []
        # 150 steps a request (~1 s each on 2 cores): demand the autoscaler can see
        work = [("a seal", 300 + i, 150) for i in range(24)]
        burst = threading.Thread(target=lambda: done.extend(_load(url, work, clients=6)),
                                 daemon=True)
        burst.start()
        seen, deadline = 1, time.monotonic() + 120
        while time.monotonic() < deadline and seen < 2:
            seen = max(seen, running())
            time.sleep(0.5)
        burst.join(timeout=300)
        assert seen == 2 and len(done) == 24
        deadline = time.monotonic() + 120
        while running() > 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert running() == 1


def test_ray_app_builder_arguments(build_fp32):
    """`serve run sdc.serve.ray_app:app_builder ...`: arguments checked by name before any
    cluster is involved."""
    from sdc.errors import SdcError
    from sdc.serve.ray_app import app_builder, parse_autoscale

    with pytest.raises(SdcError, match="unknown argument.*replica_count"):
        app_builder({"artifacts": str(build_fp32), "replica_count": "2"})
    with pytest.raises(SdcError, match="artifacts=DIR is required"):
        app_builder({"replicas": "2"})
    assert parse_autoscale("1:4") == (1, 4)
    for bad in ("4:1", "x", "2", "-1:2", "0:0"):
        with pytest.raises(SdcError, match="--autoscale"):
            parse_autoscale(bad)
    app = app_builder({"artifacts": str(build_fp32), "autoscale": "1:3", "replica_cpus": "1"})
    assert type(app).__name__ == "Application"


@pytest.mark.ray
def test_ray_replica_with_a_tampered_build_never_becomes_healthy(build_fp32, tmp_path):
    import shutil

    from ray import serve

    copy = tmp_path / "tampered"
    shutil.copytree(build_fp32, copy)
    data = copy / "unet" / "model.onnx_data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    data.write_bytes(bytes(raw))
    with ray_serve():
        with pytest.raises(RuntimeError, match="Failed to update the deployments.*engine"):
            deploy(copy, None, replicas=1)
        engine = serve.status().applications["sdc"].deployments["engine"]
        assert engine.replica_states.get("RUNNING", 0) == 0
        assert "do not match the manifest" in engine.message  # our verification, by name


@pytest.mark.ray
def test_sdc_serve_ray_cli(build_fp32, lora_dir, tmp_path):
    """The CLI path: `sdc serve --ray` starts a local cluster on 127.0.0.1, serves, and shuts
    everything down on SIGTERM."""
    from serve_server import running_server

    want = twins(tmp_path, build_fp32, lora_dir, "a seal <lora:b:0.8>", 3, 1)[0]
    before = set(_ray_processes())  # an earlier test's cluster may still be winding down
    with running_server(build_fp32, lora_dir, "--ray", "--replicas", "1", timeout=180) as srv:
        reply = post_until_answered(srv.url, body("a seal <lora:b:0.8>", 3))
        np.testing.assert_array_equal(image(reply), want)
        assert requests.get(srv.url + "/health").json()["ray"] is True
        srv.proc.terminate()  # SIGTERM: Serve and the local cluster shut down, then it exits
        assert srv.proc.wait(timeout=120) == 0, srv.tail()
    deadline = time.monotonic() + 60
    while set(_ray_processes()) - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not set(_ray_processes()) - before  # the CLI's cluster is gone with it


def _ray_processes() -> list[str]:
    """pid + command of this machine's Ray head processes."""
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln.strip() for ln in out.splitlines() if "raylet" in ln or "gcs_server" in ln]
