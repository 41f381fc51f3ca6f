"""`sdc serve`: a warm runtime Engine behind an AUTOMATIC1111-compatible HTTP API and a web page.

a1111.py   A1111's request fields -> GenerateOptions (supported, no-op defaults, refused by name),
           and its response shapes (images, parameters, info with infotexts)
models.py  the builds a server offers (sd-models) and the one Engine loaded at a time
jobs.py    the bounded queue: one generation at a time, progress, interrupt, cancel on disconnect
metrics.py Prometheus metrics (requests, queue depth, stage latencies, memory, adapter cache)
service.py the local backend: models, queue, metrics; run_request (one A1111 request)
ray_app.py the same app on Ray Serve: ingress + engine replicas, adapters multiplexed
app.py     the FastAPI app over a backend: routes, basic auth, body-size limit, one-line errors
static/    the web page served at `/`

Torch-free like the runtime: an edge box installs `sdc[runtime,serve]`.
"""
