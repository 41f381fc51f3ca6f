"""Prompt -> CLIP token ids, from the tokenizer files inside the artifact (`tokenizers` library).

Matches what diffusers' SD pipeline feeds the text encoder: BOS + tokens + EOS, padded to the
encoder's 77 positions with the tokenizer's pad token. Longer prompts keep their first 75 tokens
(plus BOS/EOS), and the caller is told what was cut so it can warn and record it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SdcError
from .store import read_json_object


@dataclass
class Tokenized:
    ids: np.ndarray  # int64 [len(prompts), max_length]
    truncated: list[str]  # per prompt: the text that did not fit ("" when nothing was cut)
    mask: np.ndarray | None = None  # int64 attention mask (T5); None for CLIP


def _load(folder: Path, kind: str, required: tuple[str, ...]):
    """(tokenizers.Tokenizer, its vocabulary) from folder/tokenizer.json, refused in one line
    when unreadable or without the special tokens `kind` needs."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise SdcError(f"{path}: cannot load tokenizer ({e}); rebuild the artifacts") from None
    vocab = tok.get_vocab()
    missing = [t for t in required if t not in vocab]
    if missing:
        raise SdcError(f"{path}: not a {kind} tokenizer (no {', '.join(missing)} token); rebuild "
                       "the artifacts")
    return tok, vocab


class PromptTokenizer:
    def __init__(self, folder: Path, max_length: int = 77):
        self._tok, vocab = _load(folder, "CLIP", ("<|startoftext|>", "<|endoftext|>"))
        self.max_length = max_length
        self.bos, self.eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        pad = "<|endoftext|>"
        config = Path(folder) / "tokenizer_config.json"
        if config.is_file():
            pad = read_json_object(config).get("pad_token", pad)
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if not isinstance(pad, str):
                raise SdcError(f"{config}: pad_token is {pad!r}, expected a token string; rebuild "
                               "the artifacts")
        self.pad = vocab.get(pad, self.eos)

    def __call__(self, prompts: list[str]) -> Tokenized:
        rows, cut = [], []
        room = self.max_length - 2
        for p in prompts:
            enc = self._tok.encode(p, add_special_tokens=False)
            ids = enc.ids
            if len(ids) > room:
                start = enc.offsets[room][0]
                cut.append(p[start:])
                ids = ids[:room]
            else:
                cut.append("")
            row = [self.bos, *ids, self.eos]
            rows.append(row + [self.pad] * (self.max_length - len(row)))
        return Tokenized(np.array(rows, dtype=np.int64), cut)


class T5PromptTokenizer:
    """Prompt -> T5 token ids and attention mask, as diffusers' IF pipelines tokenize: the
    pieces, `</s>`, then `<pad>` up to 77 (`padding="max_length", truncation=True`), with a mask
    of 1 over the pieces and `</s>`. A longer prompt keeps its first 76 pieces and `</s>`."""

    def __init__(self, folder: Path, max_length: int = 77):
        self._tok, vocab = _load(folder, "T5", ("</s>", "<pad>"))
        self.max_length = max_length
        self.eos, self.pad = vocab["</s>"], vocab["<pad>"]

    def __call__(self, prompts: list[str]) -> Tokenized:
        rows, masks, cut = [], [], []
        room = self.max_length - 1
        for p in prompts:
            enc = self._tok.encode(p, add_special_tokens=False)
            ids = enc.ids
            if len(ids) > room:
                cut.append(p[enc.offsets[room][0]:])
                ids = ids[:room]
            else:
                cut.append("")
            row = [*ids, self.eos]
            masks.append([1] * len(row) + [0] * (self.max_length - len(row)))
            rows.append(row + [self.pad] * (self.max_length - len(row)))
        return Tokenized(np.array(rows, dtype=np.int64), cut, np.array(masks, dtype=np.int64))


def make_tokenizer(folder: Path, max_length: int, kind: str = "clip"):
    """The runtime tokenizer of a family's text encoder (manifest `text_encoders[].kind`)."""
    if kind == "t5":
        return T5PromptTokenizer(folder, max_length)
    if kind != "clip":
        raise SdcError(f"{folder}: tokenizer kind {kind!r} is not one this sdc reads (clip, t5); "
                       "upgrade sdc or rebuild")
    return PromptTokenizer(folder, max_length)
