"""CLIP tokenizers of SD2.x and SDXL: sd15's CLIP BPE files with another pad token.

SD2's tokenizer and SDXL's second one pad with "!" (id 0) instead of <|endoftext|>; every other
byte is the shipped CLIP tokenizer's. So the shipped config sets (export/data/sd21, sd21-v, sdxl)
hold only each tokenizer's tokenizer_config.json (its pad token), and the files are derived here
when a build or a test needs them, instead of four more 5 MB copies in the package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SD15_TOKENIZER = Path(__file__).parent / "data" / "sd15" / "tokenizer"


def write_clip_tokenizer(out: Path, pad_token: str = "<|endoftext|>", source: Path = SD15_TOKENIZER) -> Path:
    """A copy of the shipped CLIP tokenizer (sd15's) that pads with `pad_token`.

    SD2's and SDXL's second tokenizer pad with "!" (id 0). transformers makes a pad token that is
    not already special an added special token (so a "!" in a prompt also encodes as id 0, not as
    BPE "!</w>" 256), and writes it into tokenizer.json's added_tokens; the same is done here, so
    the `tokenizers` library reading tokenizer.json (the torch-free runtime) splits prompts exactly
    as transformers.CLIPTokenizer does. tokenizer.json keeps "padding": null like sd15's: a padding
    entry there would make transformers pad every call; callers pad to 77 with the pad token named
    in tokenizer_config.json.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("LICENSE", "merges.txt", "vocab.json"):
        shutil.copy(source / name, out / name)
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["pad_token"] = pad_token
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tok = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = json.loads((source / "vocab.json").read_text(encoding="utf-8"))
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    if all(t["content"] != pad_token for t in tok["added_tokens"]):
        tok["added_tokens"].append({"id": vocab[pad_token], "content": pad_token, "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": False,
                                    "special": True})
        tok["added_tokens"].sort(key=lambda t: t["id"])
    tok["padding"] = None
    (out / "tokenizer.json").write_text(json.dumps(tok, indent=2, ensure_ascii=False), encoding="utf-8")
    return out


def shipped_tokenizer(folder: Path, out: Path) -> Path:
    """The tokenizer a shipped config set names (`folder`/tokenizer_config.json's pad token),
    written to `out`."""
    config = json.loads((Path(folder) / "tokenizer_config.json").read_text(encoding="utf-8"))
    return write_clip_tokenizer(out, config.get("pad_token", "<|endoftext|>"))
