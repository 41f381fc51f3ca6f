"""sdc-tiny's tokenizer: a real CLIP BPE tokenizer whose vocabulary is cut down to the words the
shapes captions use.

CLIP's full vocabulary (49,408 tokens) would make the tiny text encoder's embedding table alone
49,408 x 64 x 4 B = 12.6 MB, most of the 15 MB the shipped model may take, for tokens it never
trains. So the vocabulary keeps CLIP's 512 byte symbols (every byte alone and with the end-of-word
marker `</w>`, so *any* text still tokenizes, letter by letter), plus exactly the CLIP merges that
the caption words go through, in CLIP's merge order, plus the two specials. The caption words
tokenize exactly as CLIP tokenizes them (same pieces, re-numbered); the files are the standard
vocab.json + merges.txt that transformers' CLIPTokenizer and the `tokenizers` library read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..export.tiny_model import SD15_CONFIGS

SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    from ..export.data.derive_clip_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _word_merges(word: str, ranks: dict[tuple[str, str], int]) -> tuple[list[str], list[tuple]]:
    """CLIP's BPE of one lower-cased word: its final pieces and the merges applied."""
    b2u = _bytes_to_unicode()
    symbols = [b2u[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    used = []
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in
                 enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pair = (symbols[i], symbols[i + 1])
        used.append(pair)
        merged, j = [], 0
        while j < len(symbols):  # merge every occurrence of the pair, left to right
            if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == pair:
                merged.append(symbols[j] + symbols[j + 1])
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols, used


def words_of(texts: list[str]) -> list[str]:
    """CLIP's pre-tokenisation (lower case; letters, digits or single other characters)."""
    pattern = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|"
                         r"[0-9]|[^\sa-z0-9]+")
    return sorted({w for t in texts for w in pattern.findall(" ".join(t.lower().split()))})


def derive(texts: list[str], out: Path, source: Path = SD15_CONFIGS / "tokenizer") -> dict:
    """Write vocab.json, merges.txt and tokenizer configs for `texts`' words into `out`."""
    lines = (source / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line]
    ranks = {m: i for i, m in enumerate(merges)}
    used = set()
    for word in words_of(texts):
        used.update(_word_merges(word, ranks)[1])
    kept = [m for m in merges if m in used]  # CLIP's order: BPE applies merges by rank
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in kept]
    vocab_list += list(SPECIALS)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept),
                                    encoding="utf-8")
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("tokenizer_file", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "pad_token": SPECIALS[1],
        "unk_token": SPECIALS[1]}, indent=2) + "\n")
    if (source / "LICENSE").is_file():
        (out / "LICENSE").write_text((source / "LICENSE").read_text())
    return vocab
