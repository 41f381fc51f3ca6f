"""`sdc` click group. Each command parses flags and calls the library function of the same name.

Errors: library code raises SdcError with one line; `main` prints it as `error: ...` and exits with
its code (no traceback unless --debug). Build-side imports happen inside the commands, so
`sdc --help` and the runtime commands never import torch.
"""

from __future__ import annotations

import errno
import json
import signal
import sys
import threading
from pathlib import Path

import click

from .. import __version__
from ..errors import SdcError


def _console():
    from rich.console import Console

    # rich's log lines name their source line (`main.py:68`): noise to a user, kept for --debug
    return Console(stderr=True, highlight=False, log_path="--debug" in sys.argv)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdc")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """sdc: compile Stable Diffusion v1.x into lean ONNX graphs, and run them."""
    ctx.ensure_object(dict)["debug"] = debug


@cli.command()
@click.argument("model", required=False)
@click.option("--precision", default=None, metavar="fp16|fp32|int8|int4|w8a8",
              help="fp16 for GPU targets, fp32 for CPU targets (ORT's CPU runs fp16 slower); "
                   "int8/int4 quantize the weights (UNet int8/int4, text encoder int8, VAE fp16 "
                   "weights); w8a8 is the CPU speed build (UNet on 8-bit activations and weights, "
                   "integer kernels) [default: fp16; with --from: the source's].")
@click.option("--stage-precision", default=None, metavar="STAGE=FMT,...",
              help="Per-stage weight formats over --precision, e.g. "
                   "text_encoder=int8,unet=int4,vae_decoder=fp32.")
@click.option("--block-size", type=int, default=32, show_default=True,
              help="int4: weights per block (32, 64 or 128), each block with its own scale.")
@click.option("--quality-target", default=None, metavar="DB",
              help="PSNR each quantized graph must reach on calibration inputs (e.g. 35dB); the "
                   "most sensitive layer groups stay fp16 until it does (w8a8: no search, a miss "
                   "is refused) [default: int8 35, int4 25, w8a8 30].")
@click.option("--sensitivities", is_flag=True,
              help="Measure every layer group's sensitivity even when the target is met.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: artifacts/<model>-<precision>].")
@click.option("--force", is_flag=True, help="Rebuild even if an identical build exists.")
@click.option("--config", "config", type=click.Path(), default=None,
              help="Component configs for a single-file checkpoint: a shipped set (sd15, sd21, "
                   "sd21-v for 768-v models, sdxl) or a diffusers folder; default: the family's "
                   "standard one (sd15, sd21, sdxl).")
@click.option("--upscaler", type=click.Path(), default=None, metavar="DIR",
              help="DeepFloyd IF: the stage II (IF-II) diffusers folder, built as unet_2 beside "
                   "MODEL's T5 and stage I UNet.")
@click.option("--stages", default=None,
              help="Comma-separated graphs to build (default: every stage of the model's family; "
                   "SD1/SD2: text_encoder,unet,vae_decoder,vae_encoder; SDXL adds text_encoder_2).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:W[:BLOCKS]]",
              help="LoRA to fuse (repeatable), e.g. seal.safetensors:0.8:down=0,mid=1,up=1,te=0.")
@click.option("--from", "from_dir", type=click.Path(path_type=Path), default=None,
              help="Start from this existing build, without torch: re-fuse --lora into a copy, "
                   "and/or quantize it (--precision int8|int4|w8a8, --stage-precision).")
@click.option("--embedding", "embeddings", multiple=True, metavar="PATH[:TOKEN]",
              help="Textual-inversion embedding to add (repeatable); TOKEN defaults to its name.")
@click.pass_obj
@click.option("--unet-chunks", type=int, default=1, show_default=True, metavar="N",
              help="Also cut the UNet into N sub-graphs by weight size, so `sdc run "
                   "--vram-budget` can run it below its weights' size, one chunk at a time.")
def build(obj, model, precision, stage_precision, block_size, quality_target, sensitivities, out,
          force, config, upscaler, stages, loras, from_dir, embeddings, unet_chunks) -> None:
    """Export MODEL (diffusers folder, .safetensors/.ckpt, or none = built-in) to ONNX + manifest."""
    from ..fusion.embeddings import parse_embedding_arg
    from ..fusion.fuse import parse_lora_arg
    from ..quant.build import QuantizeOptions, parse_quality_target

    specs = tuple(parse_lora_arg(lo) for lo in loras)
    target = parse_quality_target(quality_target)
    console = _console()
    with console.status("building…", spinner="dots") as status:
        def log(msg: str) -> None:
            console.log(msg, markup=False)
            status.update(f"building… {msg.split(']')[0].lstrip('[')}", )

        if from_dir is not None:
            if model is not None or embeddings or unet_chunks > 1:
                raise SdcError(f"--from {from_dir} re-fuses LoRAs into an existing build: give no "
                               "MODEL, --embedding or --unet-chunks (those are set at a full build)")
            from ..quant.build import from_build

            out_dir, _, _ = from_build(QuantizeOptions(
                from_dir=from_dir, precision=precision, stage_precision=stage_precision,
                block_size=block_size, quality_target=target, measure_all=sensitivities,
                loras=specs, out=out, force=force), log=log)
            click.echo(str(out_dir))
            return
        from ..export.build import BuildOptions, build as run_build

        opts = BuildOptions(model=model, precision=precision or "fp16", out=out, force=force,
                            config=config, upscaler=upscaler, unet_chunks=unet_chunks,
                            stage_precision=stage_precision, block_size=block_size,
                            quality_target=target, measure_all=sensitivities,
                            stages=tuple(s.strip() for s in stages.split(",") if s.strip())
                            if stages is not None else None,
                            cancel=obj.get("cancel"), loras=specs,
                            embeddings=tuple(parse_embedding_arg(e) for e in embeddings))
        result = run_build(opts, log=log)
    click.echo(str(result.out))


class _Number(click.ParamType):
    """int/float options of `sdc run` whose bad text is one SdcError line (click's own message
    is three, with the usage); ranges are checked by the pipeline, which names them."""

    def __init__(self, kind: type):
        self.kind, self.name = kind, "integer" if kind is int else "number"

    def convert(self, value, param, ctx):
        if isinstance(value, self.kind) and not isinstance(value, bool):
            return value
        try:
            return self.kind(str(value).strip())
        except ValueError:
            flag = param.opts[0] if param is not None else "value"
            what = "an integer" if self.kind is int else "a number"
            raise SdcError(f"{flag} {value}: expected {what}; see `sdc run --help`") from None


_INT, _FLOAT = _Number(int), _Number(float)


@cli.command()
@click.argument("prompt")
@click.option("-a", "--artifacts", type=click.Path(path_type=Path), default=None,
              help="Build directory [default: the newest under ./artifacts].")
@click.option("--negative", default="", help="Negative prompt.")
@click.option("--steps", type=_INT, default=None,
              help="Denoising steps [default: the model's, else 20].")
@click.option("--guidance", type=_FLOAT, default=None,
              help="Classifier-free guidance scale; <= 1 skips the unconditional branch "
                   "[default: the model's (sdc-tiny: 3), else 7.5].")
@click.option("--seed", type=_INT, default=None,
              help="Seed, 0 to 2^63-1 [default: random, printed]; image i of a batch uses seed+i.")
@click.option("--width", type=_INT, default=None, help="Pixels [default: the model's native size].")
@click.option("--height", type=_INT, default=None, help="Pixels [default: the model's native size].")
@click.option("--scheduler", default=None,
              help="ddim|pndm|euler|euler-a|dpmpp-2m|dpmpp-2m-karras|lms [default: the build's].")
@click.option("--batch", type=_INT, default=1, show_default=True,
              help="Images (seeds S, S+1, ...).")
@click.option("--provider", default="auto", show_default=True, help="auto|cpu|cuda")
@click.option("--latents", "latents", type=click.Path(path_type=Path), default=None,
              help="Initial noise .npy, float32 [batch, C, H/f, W/f].")
@click.option("--init-image", type=click.Path(path_type=Path), default=None, help="img2img source.")
@click.option("--strength", type=_FLOAT, default=0.8, show_default=True,
              help="img2img: how much of the schedule to re-noise, in (0, 1].")
@click.option("--vae-tile", type=_INT, default=None,
              help="VAE decode tile in latents; 0 = untiled [default: 32 above 64 latents].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs"), show_default=True,
              help="A .png file, or a folder for <seed>.png files.")
@click.option("--no-verify", is_flag=True, help="Skip sha256 of the artifacts (sizes still checked).")
@click.option("--threads", type=_INT, default=None,
              help="onnxruntime threads per session [default: every core].")
@click.option("--lora-dir", type=click.Path(path_type=Path), default=None,
              help="Folder where <lora:NAME:WEIGHT> tags in the prompt are looked up.")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:W[:BLOCKS]]",
              help="LoRA fused at session start (repeatable); the build is not changed.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the written paths.")
@click.option("--vram-budget", default=None, metavar="SIZE",
              help="Memory the run may hold at once (4GiB, 1500MB): device memory on CUDA, RSS "
                   "above the interpreter+libraries baseline on CPU. Refused before running if "
                   "no plan fits.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the memory plan (stages, residency, tiles, chunks, estimated peaks) "
                   "and exit without running.")
@click.option("--cfg-split/--no-cfg-split", default=None,
              help="Run the CFG halves as separate UNet passes [default: the planner decides].")
@click.option("--stage-provider", "stage_providers", default=None, metavar="STAGE=P,...",
              help="Per-stage providers over --provider, e.g. vae_decoder=cpu: the VAE in host "
                   "memory, outside --vram-budget (the planner reports its peak apart).")
@click.option("--stages", "cascade", default=None, metavar="I|II",
              help="DeepFloyd IF: I stops after stage I (64 px), II runs stage II on "
                   "[default: every stage the build has].")
@click.option("--upscale-steps", type=_INT, default=None,
              help="DeepFloyd IF: stage II's denoising steps [default: 50].")
@click.option("--upscale-guidance", type=_FLOAT, default=None,
              help="DeepFloyd IF: stage II's guidance [default: 4].")
@click.option("--noise-level", type=_INT, default=None,
              help="DeepFloyd IF: the noise level stage I's upscaled image gets, 0-999 [default: 250].")
@click.pass_obj
def run(obj, prompt, artifacts, negative, steps, guidance, seed, width, height, scheduler, batch,
        provider, latents, init_image, strength, vae_tile, out, no_verify, threads, lora_dir, loras,
        quiet, vram_budget, plan_only, cfg_split, stage_providers, cascade, upscale_steps,
        upscale_guidance, noise_level) -> None:
    """Generate images for PROMPT from a build (torch-free)."""
    from ..runtime.memory import fmt_bytes
    from ..runtime.outputs import SaveInterrupted, check_out, output_paths, save_images
    from ..runtime.pipeline import GenerateOptions, plan_run, run_pipeline

    opts = GenerateOptions(prompt=prompt, artifacts=artifacts, negative=negative, steps=steps,
                           guidance=guidance, seed=seed, width=width, height=height,
                           scheduler=scheduler, batch=batch, provider=provider, latents=latents,
                           init_image=init_image, strength=strength, verify=not no_verify,
                           vae_tile=vae_tile, loras=loras, lora_dir=lora_dir,
                           vram_budget=vram_budget, cfg_split=cfg_split, threads=threads,
                           stage_providers=stage_providers, cascade=cascade,
                           upscale_steps=upscale_steps, upscale_guidance=upscale_guidance,
                           noise_level=noise_level)
    if plan_only:
        plan, _, _ = plan_run(opts)
        if plan is None:
            raise SdcError("--plan: this build has no measured memory profile (built by an older "
                           "sdc); rebuild it with this sdc")
        click.echo("\n".join(plan.describe()))
        return
    plan_run(opts)  # every input checked first (cheap: no hashing, no decoding, no session)
    check_out(out, batch)  # then an unwritable --out, before minutes of work; creates nothing
    console = _console()
    log = (lambda msg: None) if quiet else (lambda msg: console.log(msg, markup=False))
    if quiet:
        result = run_pipeline(opts, log=log)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as bar:
            tasks = {}

            def progress(stage, i, n):
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=n)
                bar.update(tasks[stage], completed=i)

            result = run_pipeline(opts, log=log, progress=progress)
    for warning in result.warnings:
        console.print(f"warning: {warning}", markup=False)
    paths = output_paths(out, result.seeds)
    # image by image, each atomic; a failure or Ctrl-C names exactly what was written
    save_images(result.images, paths, result.parameters, seeds=result.seeds,
                cancel=(obj or {}).get("cancel"), on_written=lambda p: click.echo(str(p)))
    try:
        _run_summary(result, quiet, console, fmt_bytes)
    except KeyboardInterrupt:  # every image is on disk: say so, not "nothing was written"
        raise SaveInterrupted(f"interrupted after saving; all {len(paths)} image(s) were "
                              f"written: {', '.join(map(str, paths))}") from None


def _run_summary(result, quiet, console, fmt_bytes) -> None:
    if not quiet:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
        ran_on = ", ".join(sorted(set(result.providers.values())))
        console.print(f"seed {result.seeds[0]}; {stages}; ran on {ran_on}", markup=False)
        mem = result.memory
        if mem.get("peak_bytes") is not None:
            console.print(f"peak RSS {fmt_bytes(mem['peak_bytes'])} above a "
                          f"{fmt_bytes(mem['baseline_bytes'])} baseline (planned "
                          f"{fmt_bytes(mem['planned_peak_bytes'])}"
                          + (f", budget {fmt_bytes(mem['budget_bytes'])})" if mem["budget_bytes"]
                             else ")"), markup=False)


@cli.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="For a LoRA file: match its keys against this build [default: SD1.5 layout].")
def inspect(artifacts: Path, as_json: bool, base: Path | None) -> None:
    """Summarise a build's manifest, or a LoRA file (format, rank, alpha, keys, triggers)."""
    from ..runtime.inspect import describe
    from ..runtime.manifest import load_manifest

    if artifacts.suffix.lower() == ".safetensors":
        from ..fusion.inspect import describe_lora

        text, report = describe_lora(artifacts, base)
        click.echo(json.dumps(report, indent=1) if as_json else text)
        return
    manifest = load_manifest(artifacts)
    if as_json:
        click.echo(json.dumps(manifest, indent=1))
    else:
        click.echo(describe(manifest))


@cli.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--no-hash", is_flag=True, help="Check presence and sizes only (fast).")
def verify(artifacts: Path, no_hash: bool) -> None:
    """Check every file against the manifest's sizes and sha256, and each graph's I/O schema."""
    from ..runtime.verify import verify as run_verify

    for line in run_verify(artifacts, hashes=not no_hash):
        click.echo(line)


from .train import add_commands  # noqa: E402  (train-lora, train-embedding)

add_commands(cli)
from .eval_cmd import add_commands as add_eval_commands  # noqa: E402  (eval)

add_eval_commands(cli)
from .serve_cmd import add_commands as add_serve_commands  # noqa: E402  (serve)

add_serve_commands(cli, (_INT, _FLOAT))


def _cancel_on_signals() -> tuple[threading.Event, dict]:
    """Ctrl-C and SIGTERM (schedulers, `timeout`, `kill`) cancel the command.

    The handler raises KeyboardInterrupt *and* sets an event: Python swallows an exception raised
    while a garbage-collector callback runs, so long commands also check the event at every step
    boundary and before anything is moved into place.
    """
    cancel = threading.Event()

    def handler(signum, frame):
        cancel.set()
        raise KeyboardInterrupt

    def unraisable(info):  # the interrupt swallowed by a gc callback: recorded in `cancel`
        if not issubclass(info.exc_type, KeyboardInterrupt):
            sys.__unraisablehook__(info)

    previous = {"unraisablehook": sys.unraisablehook}
    sys.unraisablehook = unraisable
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread (embedded use): leave signals to the host
        pass
    return cancel, previous


_WRITE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    cancel, previous = _cancel_on_signals()
    try:
        cli.main(args=argv, prog_name="sdc", standalone_mode=False, obj={"cancel": cancel})
    except SdcError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:  # click's wrapping of KeyboardInterrupt
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OSError as e:
        # The last line of defence for faults found late (disk full, read-only or unwritable
        # paths); the commands clean their temporary files on the way out, so this only speaks.
        if debug or e.errno not in _WRITE_FAULTS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror} — free space or choose a writable location and "
                   "run again (temporary files were removed)", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    finally:
        sys.unraisablehook = previous.pop("unraisablehook")
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
