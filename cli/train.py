"""`sdc train-lora` and `sdc train-embedding`: flags -> training/config.py -> training/*_train.py.

Every flag defaults to None (= not given) so that a `--config` file's values are overridden only by
flags the user actually typed. Torch is imported inside the commands (after the config checks).
"""

from __future__ import annotations

import sys
import warnings

import click

COMMON = [
    click.option("--data", type=click.Path(), default=None,
                 help="Folder of images, each with a same-named .txt caption."),
    click.option("--instance-prompt", default=None, help="One caption for every image instead."),
    click.option("--out", type=click.Path(), default=None, help="Output .safetensors file."),
    click.option("--reg-data", type=click.Path(), default=None,
                 help="Prior preservation: captioned pictures without the trigger, trained "
                      "alongside so prompts without it stay the base model's."),
    click.option("--steps", type=int, default=None, help="Optimizer steps [500]."),
    click.option("--lr", type=float, default=None,
                 help="Learning rate [1e-4; DeepFloyd IF 4e-5]."),
    click.option("--lr-end", type=float, default=None,
                 help="End rate of a cosine/polynomial decay [0; DeepFloyd IF 4e-6]."),
    click.option("--optimizer", default=None, help="adafactor | adamw | adamw8bit."),
    click.option("--lr-schedule", default=None,
                 help="constant | cosine | polynomial [constant; DeepFloyd IF polynomial]."),
    click.option("--warmup", type=int, default=None, help="Warmup steps [0]."),
    click.option("--batch-size", type=int, default=None, help="Images per micro-batch [1]."),
    click.option("--grad-accum", type=int, default=None, help="Micro-batches per step [1]."),
    click.option("--resolution", type=int, default=None, help="Pixels [the model's native]."),
    click.option("--crop", default=None, help="center | random [center]."),
    click.option("--flip/--no-flip", default=None, help="Add mirrored images [no]."),
    click.option("--mixed-precision", default=None,
                 help="auto | fp32 | bf16 | fp16 [auto: bf16/fp16 on CUDA, fp32 on CPU]."),
    click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                 help="Recompute activations in backward [on]."),
    click.option("--seed", type=int, default=None, help="Seed [0]."),
    click.option("--checkpoint-every", type=int, default=None, help="Steps between checkpoints."),
    click.option("--validate-every", type=int, default=None,
                 help="Steps between validation grids [0: final grid only]."),
    click.option("--samples/--no-samples", default=None,
                 help="Write the final sample grid OUT.samples.png [yes]."),
    click.option("--validation-steps", type=int, default=None,
                 help="Denoising steps of the sample images [20]."),
    click.option("--validation-guidance", type=float, default=None,
                 help="Guidance of the sample images [the model's]."),
    click.option("--cache-dir", type=click.Path(), default=None,
                 help="Latent cache [OUT.cache]."),
    click.option("--device", default=None, help="auto | cpu | cuda[:N] [auto]."),
    click.option("--config", "config_file", type=click.Path(), default=None,
                 help="TOML or JSON file with any of these settings (flags override)."),
    click.option("--print-config", is_flag=True, help="Print the effective config and exit."),
    click.option("--resume", type=click.Path(), default=None,
                 help="Continue from a checkpoint folder (OUT.checkpoints/step-N)."),
]


def _with(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


def _run(kind: str, model, config_file, print_config, resume, flags: dict) -> None:
    from ..training.config import EmbeddingConfig, LoraConfig, as_json, resolve

    cls = LoraConfig if kind == "lora" else EmbeddingConfig
    cfg = resolve(cls, config_file, {"model": model, **flags}, complete=not print_config)
    if print_config:
        click.echo(as_json(cfg))
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True, highlight=False, log_path="--debug" in sys.argv)

    def log(msg: str) -> None:
        console.log(msg, markup=False)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        if kind == "lora":
            from ..training.lora_train import train_lora as train
        else:
            from ..training.embedding_train import train_embedding as train
        # the bar starts with the first step, so errors before training print one clean line
        bar = Progress("[progress.description]{task.description}", BarColumn(),
                       MofNCompleteColumn(), "loss {task.fields[loss]:.4f}", TimeRemainingColumn(),
                       console=console, transient=True)
        task = None

        def progress(step, total, loss):
            nonlocal task
            if task is None:
                bar.start()
                task = bar.add_task("training", total=total, loss=loss)
            bar.update(task, completed=step, loss=loss)

        def relay(msg):
            for w in caught:
                console.print(f"warning: {w.message}", markup=False)
            caught.clear()
            log(msg)

        try:
            result = train(cfg, resume=resume, log=relay, progress=progress)
        finally:
            if task is not None:
                bar.stop()
        for w in caught:
            console.print(f"warning: {w.message}", markup=False)
    click.echo(result["out"])


def add_commands(cli: click.Group) -> None:
    @cli.command("train-lora")
    @click.argument("model", required=False)
    @click.option("--trigger", default=None, help="Trigger word(s) the captions use.")
    @click.option("--rank", type=int, default=None, help="LoRA rank [8].")
    @click.option("--alpha", type=float, default=None, help="LoRA alpha [= rank].")
    @click.option("--targets", default=None, help="attn | attn+conv [attn].")
    @click.option("--train-text-encoder/--no-train-text-encoder", default=None,
                  help="Also put LoRA on the text encoder [no].")
    @click.option("--model-family", default=None,
                  help="sd1 | sd2 | sdxl | deepfloyd: must match MODEL [detected].")
    @click.option("--model-flavour", default=None,
                  help="DeepFloyd IF: i-medium-400m | i-large-900m | i-xlarge-4.3b (stage I) | "
                       "ii-medium-450m | ii-large-1.2b (stage II, with --upscaler).")
    @click.option("--upscaler", type=click.Path(), default=None, metavar="DIR",
                  help="DeepFloyd IF stage II: the IF-II folder whose UNet is trained (MODEL "
                       "is the IF-I folder; its T5 encodes the captions).")
    @click.option("--resolution-type", default=None,
                  help="pixel: --resolution is the square's side [pixel; the only one].")
    @click.option("--validation-resolution", default=None,
                  help="DeepFloyd IF sample sizes, e.g. 64,96,64x96,96x64 [the resolution].")
    @_with(COMMON)
    def train_lora(model, config_file, print_config, resume, **flags):
        """Train a LoRA on MODEL (default: built-in sdc-tiny) for `sdc build --lora`; on a
        DeepFloyd IF-I folder, for stage I (or stage II with --upscaler IF-II)."""
        _run("lora", model, config_file, print_config, resume, flags)

    @cli.command("train-embedding")
    @click.argument("model", required=False)
    @click.option("--token", default=None, help="The new placeholder token, e.g. '<sks>'.")
    @click.option("--init-word", default=None, help="Word whose vector starts the token.")
    @click.option("--vectors", type=int, default=None, help="Vectors per token [1].")
    @_with(COMMON)
    def train_embedding(model, config_file, print_config, resume, **flags):
        """Textual inversion on MODEL: a new token for `sdc build --embedding`."""
        _run("embedding", model, config_file, print_config, resume, flags)
