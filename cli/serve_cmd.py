"""`sdc serve`: flags -> sdc.serve.app.ServeConfig -> uvicorn. Torch-free like `sdc run`."""

from __future__ import annotations

from pathlib import Path

import click


def add_commands(cli: click.Group, number_types) -> None:
    _INT, _FLOAT = number_types

    @cli.command("serve")
    @click.option("--artifacts", "-a", type=click.Path(path_type=Path), default=Path("artifacts"),
                  show_default=True, help="A build, or a folder of builds (each one a model).")
    @click.option("--lora-dir", type=click.Path(path_type=Path), default=None,
                  help="Folder of LoRA .safetensors files that <lora:NAME:WEIGHT> tags name.")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to bind; anything but loopback needs --api-auth.")
    @click.option("--port", type=_INT, default=7860, show_default=True)
    @click.option("--api-auth", default=None, metavar="USER:PASS",
                  help="HTTP basic auth on every route but /health.")
    @click.option("--max-queue", type=_INT, default=8, show_default=True,
                  help="Requests waiting behind the running one; more get 503 + Retry-After.")
    @click.option("--vram-budget", default=None, metavar="SIZE",
                  help="Memory budget per request (e.g. 4GiB); sessions stay resident only "
                       "when they all fit in it.")
    @click.option("--lora-cache", default="2GiB", show_default=True, metavar="SIZE",
                  help="Bytes of fused adapter weights kept (LRU).")
    @click.option("--provider", default="auto", show_default=True, help="auto|cpu|cuda")
    @click.option("--model", default=None, help="The model loaded first (name) [default: the first].")
    @click.option("--max-steps", type=_INT, default=150, show_default=True)
    @click.option("--max-size", type=_INT, default=2048, show_default=True,
                  help="Largest width/height in pixels.")
    @click.option("--max-images", type=_INT, default=16, show_default=True,
                  help="batch_size x n_iter per request.")
    @click.option("--max-body", default="32MiB", show_default=True, metavar="SIZE",
                  help="Largest request body (init images travel in it).")
    @click.option("--threads", type=_INT, default=None,
                  help="onnxruntime threads per session [default: all cores; --ray: "
                       "--replica-cpus].")
    @click.option("--stage-provider", "stage_providers", default=None, metavar="STAGE=P,...",
                  help="Per-stage providers over --provider, e.g. vae_decoder=cpu (the VAE in "
                       "host memory, outside --vram-budget).")
    @click.option("--ray", "use_ray", is_flag=True,
                  help="Deploy on Ray Serve: an ingress + engine replicas (pip install 'sdc[ray]').")
    @click.option("--replicas", type=_INT, default=1, show_default=True,
                  help="--ray: engine replicas (each its own Engine and --vram-budget).")
    @click.option("--autoscale", default=None, metavar="MIN:MAX",
                  help="--ray: autoscale the engine replicas between MIN and MAX.")
    @click.option("--ray-address", default=None, help="--ray: join this cluster [default: start "
                  "a local one bound to 127.0.0.1].")
    @click.option("--target-ongoing", type=_FLOAT, default=1.0, show_default=True,
                  help="--autoscale: requests per replica to aim at.")
    @click.option("--upscale-delay", type=_FLOAT, default=30.0, show_default=True,
                  help="--autoscale: seconds of demand before adding a replica.")
    @click.option("--downscale-delay", type=_FLOAT, default=600.0, show_default=True,
                  help="--autoscale: seconds idle before removing one.")
    @click.option("--replica-cpus", type=_FLOAT, default=1.0, show_default=True)
    @click.option("--replica-gpus", type=_FLOAT, default=0.0, show_default=True)
    @click.option("--no-multiplex", is_flag=True,
                  help="--ray: route requests to any replica, not by adapter set.")
    def serve(artifacts, lora_dir, host, port, api_auth, max_queue, vram_budget, lora_cache,
              provider, model, max_steps, max_size, max_images, max_body, threads, stage_providers,
              use_ray,
              replicas,
              autoscale, ray_address, target_ongoing, upscale_delay, downscale_delay,
              replica_cpus, replica_gpus, no_multiplex) -> None:
        """Serve builds over AUTOMATIC1111's HTTP API, with a web page at /."""
        import uvicorn

        from ..runtime.memory import parse_size
        from ..serve.a1111 import Limits
        from ..serve.app import ServeConfig, check_config, create_app

        cfg = ServeConfig(artifacts, lora_dir, host, port, api_auth, max_queue, vram_budget,
                          lora_cache, provider, model, parse_size(max_body),
                          Limits(max_steps=max_steps, max_side=max_size, max_images=max_images),
                          threads, stage_providers)
        check_config(cfg)  # unsafe or impossible settings fail before any build is read
        if use_ray:
            from ..errors import SdcError

            try:
                import ray  # noqa: F401
            except ImportError:
                raise SdcError("--ray needs Ray Serve: pip install 'sdc[ray]'") from None
            from ..serve.ray_app import RayOptions, parse_autoscale, run

            if replicas < 1:
                raise SdcError(f"--replicas {replicas}: expected 1 or more")
            run(cfg, RayOptions(replicas=replicas,
                                autoscale=parse_autoscale(autoscale) if autoscale else None,
                                address=ray_address, target_ongoing=target_ongoing,
                                upscale_delay=upscale_delay, downscale_delay=downscale_delay,
                                replica_cpus=replica_cpus, replica_gpus=replica_gpus,
                                multiplex=not no_multiplex),
                log=lambda m: click.echo(m, err=True))
            return
        app = create_app(cfg)
        click.echo(f"sdc serve: {app.state.backend.health()['model']} on http://{host}:{port}/"
                   + (" (basic auth)" if api_auth else ""), err=True)
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
