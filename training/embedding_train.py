"""`sdc train-embedding`: textual inversion. Learns N new token vectors for a placeholder token,
initialised from an ordinary word; every model weight stays frozen.

The new vectors live in their own small parameter, spliced after the frozen vocabulary by
`_SplicedEmbedding`, so the optimizer holds N x width numbers (not the 49408 x 768 table) and no
existing token's vector can move: prompts without the placeholder give exactly the base text
encoder's output. The UNet is frozen but in memory (the loss needs it); latents come from the
cache (VAE not loaded). Multi-vector tokens are named TOKEN, TOKEN_1, ... as A1111 and diffusers
do, and the output is an A1111-style `.safetensors` (`emb_params` [N, width], metadata `name`)
that `sdc build --embedding` and diffusers' `load_textual_inversion` read.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import SdcError
from ..export.quiet import quiet_torch_stack
from ..export.sources import resolve_model
from ..fusion.embeddings import token_names
from . import common
from .config import EmbeddingConfig


def _spliced_embedding_class():
    import torch

    class _SplicedEmbedding(torch.nn.Module):
        """The frozen vocabulary table followed by the trainable new rows."""

        def __init__(self, base: torch.nn.Embedding, new: torch.Tensor):
            super().__init__()
            self.base = base
            self.new = torch.nn.Parameter(new)

        @property
        def weight(self):  # transformers reads .weight for dtype/device
            return self.base.weight

        def forward(self, ids):
            table = torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)])
            return torch.nn.functional.embedding(ids, table)

    return _SplicedEmbedding


def train_embedding(cfg: EmbeddingConfig, resume: str | None = None,
                    log: Callable[[str], None] = print,
                    progress: Callable[[int, int, float], None] | None = None) -> dict:
    import torch

    t_start = time.perf_counter()
    out = Path(cfg.out)
    if not out.parent.is_dir():
        raise SdcError(f"--out {out}: folder {out.parent} does not exist; create it first")
    progress = progress or (lambda step, total, loss: None)
    source = resolve_model(cfg.model)
    common.check_trainable(source, "train-embedding")
    base_hash = source.content_hash()
    if resume:  # a wrong checkpoint fails before minutes of loading and encoding
        common.check_checkpoint(Path(resume), {"base_model_sha256": base_hash,
                                               "kind": "embedding"})
    tokenizer = common.load_tokenizer(source)
    names = token_names(cfg.token, cfg.vectors)
    taken = [t for t in names if t in tokenizer.get_vocab() or f"{t}</w>" in tokenizer.get_vocab()]
    if taken:
        raise SdcError(f"--token {cfg.token}: {taken[0]!r} is already in the vocabulary; pick a "
                       "new placeholder such as '<sks>'")
    init_ids = tokenizer(cfg.init_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise SdcError(f"--init-word {cfg.init_word!r}: tokenizes to nothing; pick a plain word")
    from .data import read_folder

    samples = read_folder(Path(cfg.data), cfg.instance_prompt)
    with_token = sum(cfg.token in s.caption for s in samples)
    if with_token == 0:
        raise SdcError(f"--token {cfg.token}: appears in none of the {len(samples)} captions; "
                       f"write it into the captions (e.g. 'a photo of {cfg.token}') or use "
                       "--instance-prompt")
    if with_token < len(samples):
        warnings.warn(f"--token {cfg.token} is missing from {len(samples) - with_token} of "
                      f"{len(samples)} captions", stacklevel=2)
    expanded = " ".join(names)

    def caption_of(c: str) -> str:
        return c.replace(cfg.token, expanded)

    with quiet_torch_stack():
        prep = common.prepare(cfg, source, caption_of, cache_text=False, log=log)
        unet = source.load("unet").to(prep.device, prep.precision.weights)
        text_encoder = source.load("text_encoder").to(prep.device)
    tokenizer.add_tokens(names)
    new_ids = tokenizer.convert_tokens_to_ids(names)
    base_rows = text_encoder.get_input_embeddings().weight.shape[0]
    if new_ids != list(range(base_rows, base_rows + len(names))):
        raise SdcError(f"the tokenizer's vocabulary ({len(tokenizer) - len(names)}) and the text "
                       f"encoder's embedding table ({base_rows}) differ in size; the model folder "
                       "is inconsistent")
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    emb = text_encoder.get_input_embeddings()
    init = emb.weight[init_ids].detach().float().mean(0)
    spliced = _spliced_embedding_class()(emb, init.repeat(len(names), 1).clone())
    text_encoder.set_input_embeddings(spliced)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    text_encoder.train()
    params = [spliced.new]
    opt = common.make_optimizer(cfg, params)
    ids_all = common.tokenize(tokenizer, prep.captions)

    must_match = {"base_model_sha256": base_hash, "kind": "embedding", "token": cfg.token,
                  "vectors": cfg.vectors, "init_word": cfg.init_word, "seed": cfg.seed,
                  "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                  "resolution": prep.resolution, "optimizer": cfg.optimizer}
    start = 0
    if resume:
        start, tensors, opt_state = common.load_checkpoint(Path(resume), must_match, cfg.steps)
        with torch.no_grad():
            spliced.new.copy_(tensors["vectors"])
        opt.load_state_dict(opt_state)
        log(f"resumed from {resume} at step {start}")
    ckpt_dir = Path(str(out) + ".checkpoints")
    losses = []
    for step in range(start, cfg.steps):
        step_loss = common.train_step(
            cfg, step, prep, unet, opt, params,
            lambda idx: text_encoder(ids_all[idx].to(prep.device)).last_hidden_state,
            start=start)
        losses.append(step_loss)
        done = step + 1
        progress(done, cfg.steps, float(np.mean(losses[-20:])))
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            common.check_finite({"vectors": spliced.new}, cfg, "embedding")
            ckpt_dir.mkdir(exist_ok=True)
            common.save_checkpoint(ckpt_dir, done, {"vectors": spliced.new}, opt,
                                   {**must_match, "base_model": source.name})

    common.check_finite({"vectors": spliced.new}, cfg, "embedding")
    vectors = spliced.new.detach().float().cpu().contiguous()
    metadata = {"name": cfg.token, "sdc.kind": "embedding", "sdc.init_word": cfg.init_word,
                "sdc.base_model": source.name, "sdc.base_model_sha256": base_hash,
                "sdc.vectors": str(cfg.vectors), "sdc.steps": str(cfg.steps),
                "sdc.version": __version__}

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file({"emb_params": vectors}, str(tmp), metadata=metadata)

    common.atomic_write(out, write)
    grid_path = out.with_suffix(".samples.png")
    prompt = prep.captions[0]
    prompts = [prompt, prompt.replace(expanded, cfg.init_word)]
    if cfg.samples:
        with quiet_torch_stack():
            imgs = common.sample_images(source, unet, text_encoder, tokenizer, prompts, [0, 1],
                                        cfg.validation_steps, common.default_guidance(source, cfg),
                                        prep.resolution, prep.device)
        common.grid(imgs, 2).save(grid_path)
    if cfg.checkpoint_every:
        ckpt_dir.mkdir(exist_ok=True)
        common.save_checkpoint(ckpt_dir, cfg.steps, {"vectors": spliced.new}, opt,
                               {**must_match, "base_model": source.name})
    from ..export.memory import process_peak_rss_bytes

    result = {"out": str(out), "samples": str(grid_path) if cfg.samples else None,
              "tokens": names, "steps": cfg.steps,
              "resumed_from": start,
              "loss_first": round(float(np.mean(losses[:20])), 5) if losses else None,
              "loss_final": round(float(np.mean(losses[-20:])), 5) if losses else None,
              "seconds": round(time.perf_counter() - t_start, 1),
              "peak_rss_gib": round(process_peak_rss_bytes() / 2**30, 2),
              "latents_encoded": prep.cache.encoded["latents"],
              "latents_cached": prep.cache.reused["latents"]}
    log(json.dumps(result))
    return result
