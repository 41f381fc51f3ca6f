"""`sdc eval`: flags -> sdc.eval.EvalOptions -> sdc.eval.evaluate, with a rich progress bar over
builds x images. Torch-free like `sdc run` (tests/test_eval.py proves it)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


class _Int(click.ParamType):
    """An integer option whose bad text is one `error:` line (click's own is three, with usage);
    ranges are checked by sdc.eval, which names them."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            from ..errors import SdcError

            raise SdcError(f"{param.opts[0] if param else 'value'} {value}: expected an integer; "
                           "see `sdc eval --help`") from None


_INT = _Int()


def add_commands(cli: click.Group) -> None:
    @cli.command("eval")
    @click.argument("builds", nargs=-1, required=True, type=click.Path(path_type=Path))
    @click.option("--reference", type=click.Path(path_type=Path), default=None,
                  help="Build the others are compared against [default: the first fp32 build "
                       "given, else the first].")
    @click.option("--prompts", type=click.Path(path_type=Path), default=None,
                  help="Text file, one prompt a line [default: 2 sdc-tiny prompts for sdc-tiny "
                       "builds, else 2 generic ones].")
    @click.option("--seeds", type=_INT, default=2, show_default=True,
                  help="Seeds 0..N-1 for every prompt (the same initial latents for every build).")
    @click.option("--width", type=_INT, default=None, help="Pixels [default: the model's native].")
    @click.option("--height", type=_INT, default=None, help="Pixels [default: the model's native].")
    @click.option("--steps", type=_INT, default=None, help="Denoising steps [default: the model's].")
    @click.option("--guidance", type=float, default=None,
                  help="Guidance scale [default: the model's].")
    @click.option("--scheduler", default=None, help="A `sdc run --scheduler` name [default: the "
                                                    "build's].")
    @click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                  show_default=True)
    @click.option("--out", type=click.Path(path_type=Path), default=Path("outputs/eval"),
                  show_default=True, help="Folder for eval.json, eval.md, grid.png (new, empty, or "
                                          "holding a previous eval only).")
    @click.option("--allow-different-models", is_flag=True,
                  help="Compare builds of different base models anyway.")
    @click.option("--quiet", "-q", is_flag=True, help="Print only the output folder.")
    def eval_cmd(builds, reference, prompts, seeds, width, height, steps, guidance, scheduler,
                 provider, out, allow_different_models, quiet):
        """Compare builds ART...: size, time, memory, PSNR/SSIM vs a reference, adherence."""
        from rich.console import Console

        from ..eval import EvalOptions, evaluate

        opts = EvalOptions(builds=tuple(builds), reference=reference, prompts=prompts,
                           seeds=seeds, width=width, height=height, steps=steps,
                           guidance=guidance, scheduler=scheduler, provider=provider, out=out,
                           allow_different_models=allow_different_models)
        console = Console(stderr=True, highlight=False, log_path="--debug" in sys.argv)
        if quiet:
            result = evaluate(opts)
        else:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                                       TimeRemainingColumn)

            with Progress("[progress.description]{task.description}", BarColumn(),
                          MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                          transient=True) as bar:
                task = bar.add_task("eval", total=None)

                def progress(done, total, what):
                    bar.update(task, completed=done, total=total, description=what)

                result = evaluate(opts, log=lambda m: console.log(m, markup=False),
                                  progress=progress)
            console.print((result.out / "eval.md").read_text(), markup=False, soft_wrap=True)
        click.echo(str(result.out))
