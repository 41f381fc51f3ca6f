"""LoRA fusion at `sdc build`: into the torch modules before export, so the parity gate's torch
reference includes the adapters. The arithmetic is fuse.py's, on the module's own fp32 weights.
"""

from __future__ import annotations

from .fuse import Applied, check_fused, fuse_param
from .lora import COMPONENTS


def known_from_configs(configs: dict) -> dict[str, set[str]]:
    """Module paths with a .weight of the UNet and text encoder the configs describe, from modules
    built on the meta device (no memory, no weights read)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        te = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    return {c: {n.removesuffix(".weight") for n, _ in m.named_parameters() if n.endswith(".weight")}
            for c, m in zip(COMPONENTS, (unet, te))}


def plan_embeddings(tokenizer_dir, args, hidden_size: int) -> list[dict]:
    """Read every (path, token) and give its tokens ids after the tokenizer's own vocabulary, in
    order (what `add_tokens` then assigns); the manifest entries, vectors included."""
    from transformers import CLIPTokenizer

    from ..errors import SdcError
    from .embeddings import read_embedding

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = tok.get_vocab()
    next_id = len(tok)
    out, seen = [], set()
    for path, token in args:
        emb = read_embedding(path, token)
        if emb.vectors.shape[1] != hidden_size:
            raise SdcError(f"--embedding {path}: vectors of width {emb.vectors.shape[1]}, the text "
                           f"encoder's is {hidden_size}; the embedding was made for another model")
        for t in emb.tokens():
            if t in vocab or t in seen:
                raise SdcError(f"--embedding {path}: token {t!r} is already in the vocabulary; "
                               "choose another with PATH:TOKEN")
            seen.add(t)
        ids = list(range(next_id, next_id + len(emb.vectors)))
        next_id += len(ids)
        out.append({**emb.report(), "ids": ids, "vectors_data": emb.vectors})
    return out


def add_tokens(tokenizer_dir, embeddings: list[dict]) -> None:
    """Add the embeddings' tokens to the build's tokenizer files, checking the ids they get."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    for emb in embeddings:
        tok.add_tokens(emb["tokens"])
        got = tok.convert_tokens_to_ids(emb["tokens"])
        if got != emb["ids"]:
            raise AssertionError(f"tokenizer gave {got}, planned {emb['ids']}")
    tok.save_pretrained(str(tokenizer_dir))


class TorchFusion:
    """Fuses once per component from its fp32 load and replays the result onto a later fp16 load
    (cast from the fused fp32 values: the fp16 graph gets the same adapters, rounded once more).
    Embeddings append rows to the text encoder's token embedding at their planned ids."""

    def __init__(self, applied: Applied, embeddings: list[dict] | None = None, keep: bool = True):
        self.applied = applied
        # keep the fused fp32 weights for a later fp16 reload; an fp32 build has none, and the
        # copies cost memory (a rank-32 LoRA on every UNet conv: 4.3 -> 6.5 GiB build peak).
        # keep=True is what an fp16 build passes, so it also means "check the fp16 range".
        self.keep = keep
        self.embeddings = embeddings or []
        self.cache: dict[tuple[str, str], object] = {}
        self.max_delta: dict[str, float] = {}

    def apply(self, module, component: str) -> int:
        import torch

        if component == "text_encoder" and self.embeddings:
            self._add_rows(module)
        params = dict(module.named_parameters())
        names = self.applied.params(component)
        for name in names:
            key = (component, name)
            p = params[name]
            if key not in self.cache:
                if p.dtype != torch.float32:
                    raise AssertionError("LoRAs are fused from the fp32 load first")
                fused, deltas = fuse_param(f"{component} {name}", p.detach().numpy(),
                                           self.applied.terms[key], "float32")
                if self.keep:
                    # the fp16 graphs get these values cast to fp16: refuse now what fp16 cannot
                    # hold (the check re-fuse and run-time swap make), before any export
                    check_fused(f"{component} {name}", fused, "float16")
                for source, d in deltas.items():
                    self.max_delta[source] = max(self.max_delta.get(source, 0.0), d)
                with torch.no_grad():
                    p.copy_(torch.from_numpy(fused))
                if self.keep:
                    self.cache[key] = torch.from_numpy(fused)
                continue
            with torch.no_grad():
                p.copy_(self.cache[key].to(p.dtype))
        return len(names)

    def _add_rows(self, module) -> None:
        import torch

        ids = [i for e in self.embeddings for i in e["ids"]]
        module.resize_token_embeddings(max(ids) + 1)
        table = module.get_input_embeddings().weight
        with torch.no_grad():
            for e in self.embeddings:
                table[e["ids"]] = torch.from_numpy(e["vectors_data"]).to(table.dtype)
