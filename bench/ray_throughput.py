"""Throughput of `sdc serve` on one machine: the plain server against Ray Serve with 1 and 2
engine replicas, same requests from the same concurrent clients. Not a test (`make bench`).

Each configuration gets N txt2img requests (distinct seeds, no LoRA) from C client threads after
one warm-up request per replica; requests/s = N / wall. The plain server runs as its own process
(`sdc serve`); the Ray deployments in a local cluster bound to 127.0.0.1 (1 CPU per replica).
On a 2-core machine two replicas share the cores with the ingress and Ray itself, so the ratio
says what Ray's routing costs and buys here, not what two machines would give.

    python bench/ray_throughput.py --build artifacts/sdc-tiny-fp32 [--requests 40] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def load(url: str, n: int, clients: int, steps: int, size: int) -> float:
    def one(seed: int) -> None:
        for _ in range(200):
            r = requests.post(url + "/sdapi/v1/txt2img", timeout=300, json={
                "prompt": "a red circle on a blue background", "seed": seed, "steps": steps,
                "width": size, "height": size})
            if r.status_code == 503:
                time.sleep(0.1)
                continue
            r.raise_for_status()
            return
        raise RuntimeError("still 503 after 200 tries")

    for seed in range(2):  # warm every replica (each creates its sessions on first use)
        one(10_000 + seed)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ray-replicas", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ray_replicas:  # the child: one Ray configuration, its requests/s on stdout
        from test_serve_ray import deploy, ray_serve

        with ray_serve() as url:
            deploy(args.build, None, replicas=args.ray_replicas, max_queue=args.requests)
            print(json.dumps(load(url, args.requests, args.clients, args.steps, args.size)))
        return
    from serve_server import running_server

    results = {"machine": {"cpu": _cpu(), "cores": __import__("os").cpu_count(),
                           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
               "settings": {k: str(v) for k, v in vars(args).items() if k != "ray_replicas"},
               "requests_per_s": {}}
    with running_server(args.build, None, "--max-queue", str(args.requests)) as srv:
        rps = load(srv.url, args.requests, args.clients, args.steps, args.size)
    results["requests_per_s"]["sdc serve"] = round(rps, 2)
    print(f"sdc serve (one process)           {rps:.2f} requests/s", flush=True)
    for replicas in (1, 2):  # each Ray cluster in its own process, started and shut down there
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--ray-replicas",
                               str(replicas)], capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        rps = float(next(ln for ln in reversed(proc.stdout.splitlines())  # Ray prints too
                         if ln.strip().replace(".", "", 1).isdigit()))
        results["requests_per_s"][f"ray, {replicas} replica(s)"] = round(rps, 2)
        print(f"sdc serve --ray --replicas {replicas}      {rps:.2f} requests/s", flush=True)
    out = HERE / "results" / f"ray_throughput_{args.build.name}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
