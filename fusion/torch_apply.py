"""LoRA fusion at `sdc build`: into the torch modules before export, so the parity gate's torch
reference includes the adapters. The arithmetic is fuse.py's, on the module's own fp32 weights.
"""

from __future__ import annotations

from .fuse import Applied, check_fused, fuse_param
from .lora import Known


def _family_of(configs: dict, family=None):
    from ..families import SD1, SDXL

    return family or (SDXL if "text_encoder_2" in configs else SD1)


def known_from_configs(configs: dict, family=None) -> Known:
    """{component: {module path with a .weight: its shape}} of every component a LoRA of `family`
    may change (its `diffusers_prefixes`: SD1.x/SD2.x unet + text_encoder; SDXL also
    text_encoder_2, a CLIPTextModelWithProjection), each built from its config with the family's
    own class (`family.components`) on the meta device (no memory, no weights read). `family`
    defaults to SDXL when the configs have a text_encoder_2, else SD1."""
    import diffusers
    import torch
    import transformers

    family = _family_of(configs, family)
    out = {}
    for component in [*family.diffusers_prefixes, *dict(family.lora_alternates)]:
        if component not in configs:
            continue
        library, cls_name = family.components[component]
        with torch.device("meta"):
            if library == "diffusers":
                module = getattr(diffusers, cls_name).from_config(configs[component])
            else:
                cls = getattr(transformers, cls_name)
                module = cls(cls.config_class.from_dict(configs[component]))
        out[component] = {n.removesuffix(".weight"): tuple(p.shape)
                          for n, p in module.named_parameters() if n.endswith(".weight")}
        del module
    return Known(out, family)


def plan_embeddings(tokenizer_dir, args, hidden_size, family=None) -> list[dict]:
    """Read every (path, token) and give its tokens ids after the tokenizer's own vocabulary, in
    order (what `add_tokens` then assigns); the manifest entries, vectors included.

    SD1.x/SD2.x (the build's one text encoder): `hidden_size` is its width (an int), or
    {"text_encoder": width}; each entry has `ids` and `vectors_data` [n, width].
    SDXL: `hidden_size` is {"text_encoder": 768-ish, "text_encoder_2": 1280-ish} and
    `tokenizer_dir` either {"text_encoder": tokenizer folder, "text_encoder_2": tokenizer_2
    folder} or one folder for both; every embedding must be an SDXL one (clip_l -> text_encoder,
    clip_g -> text_encoder_2), and each entry also has `encoder_ids` {component: ids} and `dims`
    {component: width}, with `vectors_data` {component: [n, width]} (`ids` are text_encoder's).
    `family` (a sdc.families.Family) names the build in refusals; by default it is inferred from
    the encoders (two: SDXL).
    An embedding for another family (an SDXL clip_l/clip_g file on an SD1.x build, a one-tensor
    SD1.x/SD2.x file on SDXL, or any width that is not the encoder's) is one SdcError line."""
    from transformers import CLIPTokenizer

    from ..errors import SdcError
    from .embeddings import SDXL_PARTS, family_of_width, read_embedding

    widths = dict(hidden_size) if isinstance(hidden_size, dict) else \
        {"text_encoder": int(hidden_size)}
    dirs = dict(tokenizer_dir) if isinstance(tokenizer_dir, dict) else \
        {c: tokenizer_dir for c in widths}
    if set(dirs) != set(widths):
        raise AssertionError(f"tokenizers for {sorted(dirs)}, widths for {sorted(widths)}")
    if family is None:
        from ..families import SDXL

        title = SDXL.title if len(widths) > 1 else family_of_width(widths["text_encoder"])
    else:
        title = family.title
    two = len(widths) > 1
    if two and set(widths) != set(SDXL_PARTS.values()):
        raise AssertionError(f"two text encoders must be {sorted(SDXL_PARTS.values())}")
    toks = {c: CLIPTokenizer.from_pretrained(str(d)) for c, d in dirs.items()}
    vocabs = {c: t.get_vocab() for c, t in toks.items()}
    next_ids = {c: len(t) for c, t in toks.items()}
    out, seen = [], set()
    for path, token in args:
        emb = read_embedding(path, token)
        label = f"--embedding {path}"
        if two:
            if emb.parts is None:
                w = emb.vectors.shape[1]
                raise SdcError(
                    f"{label}: one set of vectors of width {w} (an {family_of_width(w)} "
                    f"embedding), but this build is {title}, whose embeddings hold clip_l "
                    f"[n, {widths['text_encoder']}] and clip_g [n, {widths['text_encoder_2']}]; "
                    f"use an embedding made for {title}")
            vectors = {}
            for part, component in SDXL_PARTS.items():
                w = emb.parts[part].shape[1]
                if w != widths[component]:
                    raise SdcError(
                        f"{label}: {part} vectors of width {w}, this {title} build's "
                        f"{component} is {widths[component]} wide; the embedding was made for "
                        "another model")
                vectors[component] = emb.parts[part]
        else:
            (component, width), = widths.items()
            if emb.parts is not None:
                dims = ", ".join(f"{p} [n, {a.shape[1]}]" for p, a in emb.parts.items())
                raise SdcError(
                    f"{label}: an SDXL embedding ({dims}: two text encoders), but this build is "
                    f"{title} with one text encoder of width {width}; use an embedding made for "
                    f"{title}")
            w = emb.vectors.shape[1]
            if w != width:
                made = family_of_width(w, None)
                raise SdcError(
                    f"{label}: vectors of width {w}{f' (an {made} embedding)' if made else ''}, "
                    f"the text encoder's is {width} (this build is {title}); the embedding was "
                    "made for another model")
            vectors = emb.vectors
        for t in emb.tokens():
            if t in seen or any(t in v for v in vocabs.values()):
                raise SdcError(f"{label}: token {t!r} is already in the vocabulary; "
                               "choose another with PATH:TOKEN")
            seen.add(t)
        ids = {}
        for c in widths:
            ids[c] = list(range(next_ids[c], next_ids[c] + len(emb.vectors)))
            next_ids[c] += len(emb.vectors)
        first = "text_encoder" if "text_encoder" in ids else next(iter(ids))
        entry = {**emb.report(), "ids": ids[first], "vectors_data": vectors}
        if two:
            entry.update(encoder_ids=ids, dims={c: int(a.shape[1]) for c, a in vectors.items()})
        out.append(entry)
    return out


def add_tokens(tokenizer_dir, embeddings: list[dict], component: str | None = None) -> None:
    """Add the embeddings' tokens to the build's tokenizer files, checking the ids they get: those
    planned for `component`'s tokenizer (SDXL: text_encoder's or text_encoder_2's; by default
    text_encoder's, which is the one an SD1.x/SD2.x build has)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    for emb in embeddings:
        tok.add_tokens(emb["tokens"])
        got = tok.convert_tokens_to_ids(emb["tokens"])
        want = emb.get("encoder_ids", {}).get(component, emb["ids"]) if component else emb["ids"]
        if got != want:
            raise AssertionError(f"tokenizer gave {got}, planned {want}")
    tok.save_pretrained(str(tokenizer_dir))


class TorchFusion:
    """Fuses once per component from its fp32 load and replays the result onto a later fp16 load
    (cast from the fused fp32 values: the fp16 graph gets the same adapters, rounded once more).
    Embeddings append rows to each text encoder's token embedding at their planned ids (SDXL:
    clip_l's vectors to text_encoder, clip_g's to text_encoder_2)."""

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

        if self.embeddings and component in self.embedding_components():
            self._add_rows(module, component)
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

    def embedding_components(self) -> set[str]:
        return {c for e in self.embeddings
                for c in (e["vectors_data"] if isinstance(e["vectors_data"], dict)
                          else ("text_encoder",))}

    def _add_rows(self, module, component: str = "text_encoder") -> None:
        import torch

        rows = []
        for e in self.embeddings:
            vectors = e["vectors_data"]
            if isinstance(vectors, dict):
                if component not in vectors:
                    continue
                vectors, ids = vectors[component], e["encoder_ids"][component]
            elif component == "text_encoder":
                ids = e["ids"]
            else:
                continue
            rows.append((ids, vectors))
        if not rows:
            return
        module.resize_token_embeddings(max(i for ids, _ in rows for i in ids) + 1)
        table = module.get_input_embeddings().weight
        with torch.no_grad():
            for ids, vectors in rows:
                table[ids] = torch.from_numpy(vectors).to(table.dtype)
