"""Regenerate the shipped CLIP tokenizer files from the original CLIP BPE merge list.

SD1.x uses OpenAI's CLIP ViT-L/14 tokenizer (49,408 tokens). No model hub may be reached, so sdc
ships the tokenizer as data, derived here from `bpe_simple_vocab_16e6.txt.gz` (MIT licence, see
`sd15/tokenizer/LICENSE`), which lies inside the `open_clip_torch` wheel:

    pip download --no-deps open_clip_torch -d /tmp/oc && unzip /tmp/oc/*.whl -d /tmp/oc
    python export/data/derive_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

The vocabulary order is CLIP's own (simple_tokenizer.py): 256 byte symbols, the same with the
end-of-word marker `</w>`, one token per merge (the first 48,894 merges), then the two specials.
Writes vocab.json + merges.txt (read by every CLIP tokenizer implementation) and tokenizer.json
(the `tokenizers` library format the torch-free runtime loads).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 256 * 2 - 2  # 48,894: the merges CLIP keeps
OUT = Path(__file__).parent / "sd15" / "tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def derive(bpe_gz: Path, out: Path = OUT) -> None:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab_list) == VOCAB_SIZE, len(vocab_list)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out / "merges.txt").write_text(merges_txt, encoding="utf-8")

    # tokenizer.json through transformers' own CLIP tokenizer so its pre-tokenizer and
    # post-processor (BOS/EOS) match what diffusers pipelines use.
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(out), model_max_length=77)
    tok.save_pretrained(str(out))
    ids = tok("a photo of a cat")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    print(f"wrote {out} ({len(vocab)} tokens); 'a photo of a cat' -> {ids}")


if __name__ == "__main__":
    derive(Path(sys.argv[1]))
