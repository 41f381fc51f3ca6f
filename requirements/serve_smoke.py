"""`make runtime-check`'s serve step: `sdc serve` from the runtime-only environment (no torch),
asked for one image over HTTP with the standard library alone, then stopped.

    python requirements/serve_smoke.py SDC_EXECUTABLE BUILD OUT.png
"""

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.request


def main(sdc: str, build: str, out: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sdc, "serve", "-a", build, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                sys.exit(f"serve-smoke: sdc serve exited {proc.returncode}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("serve-smoke: sdc serve not healthy within 60 s")
                time.sleep(0.2)
        body = json.dumps({"prompt": "a red circle on a blue background", "seed": 0,
                           "steps": 20}).encode()
        req = urllib.request.Request(url + "/sdapi/v1/txt2img", body,
                                     {"content-type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        with open(out, "wb") as f:
            f.write(base64.b64decode(reply["images"][0]))
        print(f"serve-smoke: {out} ({json.loads(reply['info'])['infotexts'][0].splitlines()[-1]})")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    main(*sys.argv[1:4])
