"""LoRA files, embeddings and checkpoints are untrusted input: every malformed one is refused with
one `error:` line naming the file, a non-zero exit and no traceback.

The bad files are crafted byte by byte here (8-byte little-endian header length, header JSON,
tensor bytes), starting from small valid files that the same commands accept, so each case fails
for the one reason it is about. Most cases go through the real `sdc inspect FILE.safetensors`
(no build needed, ~0.2 s each); a representative few go through `sdc run --lora`, `sdc build
--lora`, `sdc build --from ... --lora`, `sdc build --embedding` and single-file checkpoint
detection; checkpoint (.ckpt) and .pt cases call the library so torch loads once.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_sdc

from sdc.errors import SdcError

MOD = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a module of SD1.5's layout (inspect's)
PEFT = "unet.down_blocks.0.attentions.0.proj_in"
_DTYPE = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
          np.dtype(np.int64): "I64", np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8"}


# ---------------------------------------------------------------------------------------------
# writing files by hand


def raw_file(path, header, data: bytes = b"", length: int | None = None):
    """A safetensors-shaped file: `header` is dumped as JSON unless it is already bytes; `length`
    overrides the 8-byte header length."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + body + data)
    return path


def st_parts(tensors: dict, metadata: dict | None = None) -> tuple[dict, bytes]:
    header, chunks, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        raw = arr.tobytes()
        header[name] = {"dtype": _DTYPE[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def write_st(path, tensors: dict, metadata: dict | None = None, edit=None, cut: int = 0):
    """A valid file of `tensors`, then `edit(header)` applied and `cut` bytes dropped at the end."""
    header, data = st_parts(tensors, metadata)
    if edit is not None:
        edit(header)
    return raw_file(path, header, data[:len(data) - cut])


def kohya(rank=2, alpha=2.0, down_shape=None, up_shape=None, dtype=np.float32) -> dict:
    rng = np.random.default_rng(0)
    down = rng.standard_normal(down_shape or (rank, 8)).astype(dtype)
    up = rng.standard_normal(up_shape or (8, rank)).astype(dtype)
    out = {f"{MOD}.lora_down.weight": down, f"{MOD}.lora_up.weight": up}
    if alpha is not None:
        out[f"{MOD}.alpha"] = np.asarray(alpha, np.float32)
    return out


def peft_tensors() -> dict:
    rng = np.random.default_rng(1)
    return {f"{PEFT}.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
            f"{PEFT}.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32)}


def adapter_meta(**fields) -> dict:
    meta = {"unet.r": 2, "unet.lora_alpha": 4, "unet.alpha_pattern": {}, "unet.rank_pattern": {}}
    meta.update({k.replace("__", "."): v for k, v in fields.items()})
    return {"lora_adapter_metadata": json.dumps(meta)}


def assert_one_line(proc, path, *needles, only: bool = False):
    """Exit non-zero with one `error:` line naming `path`, last on stderr (a build logs its
    progress there first; `only` demands that nothing else was printed)."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert not only or len(lines) == 1, proc.stderr
    assert str(path) in errors[0], errors[0]
    for n in needles:
        assert n.lower() in errors[0].lower(), (n, errors[0])


def refused(path, *needles):
    assert_one_line(run_sdc("inspect", path, check=False), path, *needles, only=True)


def assert_sdc_error(fn, path, *needles):
    with pytest.raises(SdcError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    for n in needles:
        assert n.lower() in msg.lower(), (n, msg)


# ---------------------------------------------------------------------------------------------
# the valid starting points are accepted


def test_valid_files_are_accepted(tmp_path):
    good = write_st(tmp_path / "good.safetensors", kohya(), {
        "ss_tag_frequency": json.dumps({"10_sks": {"sks seal": 12, "photo": 3}})})
    proc = run_sdc("inspect", good)
    assert "kohya" in proc.stdout and "sks seal, photo" in proc.stdout
    peft = write_st(tmp_path / "peft.safetensors", peft_tensors(),
                    adapter_meta(unet__alpha_pattern={"proj_in": 6}))
    assert "alpha: 6 (from metadata)" in run_sdc("inspect", peft).stdout
    # padding after the JSON (the format allows trailing spaces) and a null __metadata__
    header, data = st_parts(kohya(), None)
    header["__metadata__"] = None
    body = json.dumps(header).encode() + b"   "
    assert run_sdc("inspect", raw_file(tmp_path / "pad.safetensors", body, data)).returncode == 0


# ---------------------------------------------------------------------------------------------
# the header itself


@pytest.mark.parametrize("body,needle", [
    (b"[]", "JSON list"), (b"null", "JSON null"), (b"42", "JSON number"),
    (b'"a string"', "JSON string"), (b"{not json", "not JSON"),
    (b'{"a": 1, "a": 2}', "twice"),
    (b'{"x": "\xff\xfe"}', "not UTF-8"),
    (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "levels deep"),
    (b"[" * 5000, "levels deep"),  # unbalanced too: still refused before json.loads recurses
], ids=["list", "null", "number", "string", "garbage", "duplicate", "utf8", "deep", "deep-open"])
def test_header_not_a_json_object(tmp_path, body, needle):
    refused(raw_file(tmp_path / "h.safetensors", body), needle)


@pytest.mark.parametrize("length,needle", [
    (0, "header length is 0"), (1, "header length is 1"),
    (2**63, "exceeds"), (2**64 - 1, "exceeds"), (10_000, "past the end"),
], ids=["zero", "one", "huge", "max", "past-eof"])
def test_header_length(tmp_path, length, needle):
    header, data = st_parts(kohya())
    refused(raw_file(tmp_path / "n.safetensors", header, data, length=length), needle)


def test_shorter_than_the_length_field(tmp_path):
    f = tmp_path / "short.safetensors"
    f.write_bytes(b"\x02\x00\x00")
    refused(f, "shorter than the 8-byte")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    refused(empty, "0 bytes")


def test_header_with_no_tensors(tmp_path):
    refused(raw_file(tmp_path / "none.safetensors", {}), "no tensors")
    refused(raw_file(tmp_path / "meta.safetensors", {"__metadata__": {"a": "b"}}), "no tensors")


# ---------------------------------------------------------------------------------------------
# per tensor entry


DOWN = f"{MOD}.lora_down.weight"


def _set(field, value):
    def edit(h):
        if value is _DELETE:
            del h[DOWN][field]
        else:
            h[DOWN][field] = value
    return edit


_DELETE = object()


@pytest.mark.parametrize("edit,needle", [
    (lambda h: h.__setitem__(DOWN, [1, 2]), "is a JSON list, expected an object"),
    (lambda h: h.__setitem__(DOWN, "F32"), "is a JSON string, expected an object"),
    (_set("dtype", _DELETE), "dtype null"),
    (_set("dtype", 5), "dtype 5"),
    (_set("dtype", ["F32"]), "expected a string"),
    (_set("dtype", "F17"), "unknown dtype 'F17'"),
    (_set("shape", _DELETE), "shape null"),
    (_set("shape", "2,8"), "non-negative integers"),
    (_set("shape", [True, 8]), "non-negative integers"),
    (_set("shape", [2.0, 8]), "non-negative integers"),
    (_set("shape", [-2, -8]), "non-negative integers"),
    (_set("shape", ["2", 8]), "non-negative integers"),
    (_set("shape", [[2], 8]), "non-negative integers"),
    (_set("data_offsets", _DELETE), "data_offsets null"),
    (_set("data_offsets", [0]), "0 <= begin <= end"),
    (_set("data_offsets", [0, 32, 64]), "0 <= begin <= end"),
    (_set("data_offsets", [0.0, 64.0]), "0 <= begin <= end"),
    (_set("data_offsets", [False, 64]), "0 <= begin <= end"),
    (_set("data_offsets", [-64, 0]), "0 <= begin <= end"),
    (_set("data_offsets", [64, 0]), "0 <= begin <= end"),
    (_set("data_offsets", {"begin": 0}), "0 <= begin <= end"),
    (_set("shape", [2, 9]), "needs 72 bytes but its data_offsets span 64"),
    (_set("dtype", "F16"), "needs 32 bytes"),
    # 2**80 elements: a wrapping int64 product would come out 0 and match an empty range
    (lambda h: h[DOWN].update(shape=[2**40, 2**40], data_offsets=[0, 0]),
     f"needs {4 * 2**80} bytes"),
    (lambda h: h[DOWN].update(shape=[2**32, 2**32, 4], data_offsets=[0, 0]), "bytes but its"),
])
def test_bad_tensor_entries(tmp_path, edit, needle):
    refused(write_st(tmp_path / "e.safetensors", kohya(), edit=edit), needle)


def test_truncated_tensor_bytes(tmp_path):
    refused(write_st(tmp_path / "cut.safetensors", kohya(), cut=1), "truncated", "download")


def test_offsets_past_the_end(tmp_path):
    def edit(h):  # consistent sizes, but placed beyond the data
        h[DOWN]["data_offsets"] = [10_000, 10_064]
    refused(write_st(tmp_path / "far.safetensors", kohya(), edit=edit), "truncated")


def test_overlapping_tensors(tmp_path):
    def edit(h):  # the up weight's bytes start inside the down weight's
        h[f"{MOD}.lora_up.weight"]["data_offsets"] = [32, 96]
    refused(write_st(tmp_path / "ovl.safetensors", kohya(), edit=edit), "overlap")

    def alias(h):  # exactly the same bytes read as two tensors
        h[f"{MOD}.lora_up.weight"]["data_offsets"] = list(h[DOWN]["data_offsets"])
    refused(write_st(tmp_path / "alias.safetensors", kohya(), edit=alias), "overlap")


def test_huge_tensor_name_is_cut_short(tmp_path):
    name = "x" * 100_000
    f = write_st(tmp_path / "long.safetensors", {name: np.zeros(2, np.float32)},
                 edit=lambda h: h[name].update(dtype="nope"))
    proc = run_sdc("inspect", f, check=False)
    assert_one_line(proc, f, "unknown dtype")
    assert len(proc.stderr) < 1000


# ---------------------------------------------------------------------------------------------
# __metadata__ is str -> str


@pytest.mark.parametrize("meta,needle", [
    ([1, 2], "__metadata__ is a JSON list"), ("text", "__metadata__ is a JSON string"),
    (7, "__metadata__ is a JSON number"),
    ({"ss_network_dim": 4}, "'ss_network_dim' is a JSON number, expected a string"),
    ({"a": None}, "is a JSON null"), ({"a": {"b": "c"}}, "is a JSON object"),
    ({"a": ["x"]}, "is a JSON list"), ({"a": True}, "is a JSON boolean"),
], ids=["list", "string", "number", "int-value", "null-value", "dict-value", "list-value",
        "bool-value"])
def test_metadata_must_be_strings(tmp_path, meta, needle):
    def edit(h):
        h["__metadata__"] = meta
    refused(write_st(tmp_path / "m.safetensors", kohya(), edit=edit), needle)


# ---------------------------------------------------------------------------------------------
# JSON inside metadata that sdc interprets


@pytest.mark.parametrize("meta,needle", [
    ({"lora_adapter_metadata": "{unet.r: 2"}, "lora_adapter_metadata is not JSON"),
    ({"lora_adapter_metadata": "[1, 2]"}, "lora_adapter_metadata is a JSON list"),
    ({"lora_adapter_metadata": "[" * 1000 + "]" * 1000}, "levels deep"),
    (adapter_meta(unet__lora_alpha="8"), "unet.lora_alpha is '8' (a JSON string)"),
    (adapter_meta(unet__lora_alpha=True), "unet.lora_alpha is true"),
    (adapter_meta(unet__lora_alpha=-4), "unet.lora_alpha is -4"),
    (adapter_meta(unet__lora_alpha=float("inf")), "unet.lora_alpha is inf"),
    (adapter_meta(unet__lora_alpha=float("nan")), "unet.lora_alpha is nan"),
    (adapter_meta(text_encoder__lora_alpha=[1]), "text_encoder.lora_alpha"),
    (adapter_meta(unet__alpha_pattern=["proj_in"]), "unet.alpha_pattern is a JSON list"),
    (adapter_meta(unet__alpha_pattern={"proj_in": "6"}), "alpha_pattern['proj_in'] is '6'"),
    (adapter_meta(unet__alpha_pattern={"proj_in": -1}), "finite number >= 0"),
    (adapter_meta(unet__rank_pattern="proj_in=4"), "unet.rank_pattern is a JSON string"),
    (adapter_meta(unet__rank_pattern={"proj_in": 0}), "positive integer"),
    (adapter_meta(unet__rank_pattern={"proj_in": 2.5}), "positive integer"),
    (adapter_meta(unet__r="2"), "unet.r is '2'"),
], ids=["not-json", "list", "deep", "alpha-str", "alpha-bool", "alpha-neg", "alpha-inf",
        "alpha-nan", "te-alpha-list", "pattern-list", "pattern-str", "pattern-neg",
        "rank-pattern-str", "rank-pattern-zero", "rank-pattern-float", "r-str"])
def test_bad_lora_adapter_metadata(tmp_path, meta, needle):
    refused(write_st(tmp_path / "p.safetensors", peft_tensors(), meta), needle)


@pytest.mark.parametrize("freq,needle", [
    ("{not json", "ss_tag_frequency is not JSON"),
    ("[1, 2]", "ss_tag_frequency is a JSON list"),
    (json.dumps({"10_sks": ["sks"]}), "ss_tag_frequency['10_sks'] is a JSON list"),
    (json.dumps({"10_sks": {"sks": "12"}}), "['sks'] is '12'"),
    (json.dumps({"10_sks": {"sks": -1}}), "an integer >= 0"),
    (json.dumps({"10_sks": {"sks": 1.5}}), "an integer >= 0"),
    (json.dumps({"10_sks": {"sks": None}}), "is null"),
    ('{"a": {"b": Infinity}}', "an integer >= 0"),
    ('{"a": ' * 50 + "1" + "}" * 50, "levels deep"),
], ids=["not-json", "list", "inner-list", "count-str", "count-neg", "count-float", "count-null",
        "count-inf", "deep"])
def test_bad_tag_frequency(tmp_path, freq, needle):
    refused(write_st(tmp_path / "k.safetensors", kohya(), {"ss_tag_frequency": freq}), needle)


# ---------------------------------------------------------------------------------------------
# LoRA tensors


def _nan_alpha(t):
    t[f"{MOD}.alpha"] = np.asarray(np.nan, np.float32)


@pytest.mark.parametrize("tensors,needle", [
    (kohya(rank=0), "rank >= 1"),
    (kohya(down_shape=(2, 0)), "non-empty"),
    (kohya(down_shape=(2, 8), up_shape=(8, 3)), "rank differs"),
    (kohya(down_shape=(2, 8, 3), up_shape=(8, 2, 1)), "expected 2-D (linear) or 4-D (conv)"),
    (kohya(down_shape=(2, 8), up_shape=(8, 2, 1, 1)), "expected 2-D (linear) or 4-D (conv)"),
    (kohya(down_shape=(2, 8, 3, 3), up_shape=(8, 2, 3, 3)), "[out, rank, 1, 1]"),
    (kohya(dtype=np.int32), "expected float weights"),
    (kohya(alpha=np.nan), "alpha is nan"),
    (kohya(alpha=np.inf), "alpha is inf"),
    (kohya(alpha=-2.0), "alpha >= 0"),
    (kohya(alpha=[1.0, 2.0]), "expected one number"),
    (kohya(alpha=np.zeros(0)), "expected one number"),
], ids=["rank0", "in0", "no-chain", "3d", "ndim-mismatch", "conv-up-kernel", "int", "alpha-nan",
        "alpha-inf", "alpha-neg", "alpha-2", "alpha-empty"])
def test_bad_lora_tensors(tmp_path, tensors, needle):
    refused(write_st(tmp_path / "t.safetensors", tensors), needle)


def test_nan_in_weights_and_bool_alpha(tmp_path):
    t = kohya()
    t[DOWN][0, 0] = np.inf
    refused(write_st(tmp_path / "inf.safetensors", t), "NaN or Inf")
    t = kohya(alpha=None)
    t[f"{MOD}.alpha"] = np.asarray(True)
    refused(write_st(tmp_path / "bool.safetensors", t), "expected one number")


# ---------------------------------------------------------------------------------------------
# the other commands that read a LoRA go through the same parser


RUN = ["a seal", "--steps", "2", "--seed", "5", "--width", "64", "--height", "64", "--quiet"]


def test_run_lora_refuses_bad_files(tmp_path, build_fp32):
    for name, f, needle in (
        ("overlap", write_st(tmp_path / "o.safetensors", kohya(), edit=lambda h: h[
            f"{MOD}.lora_up.weight"].update(data_offsets=[0, 64])), "overlap"),
        ("meta", write_st(tmp_path / "m.safetensors", peft_tensors(),
                          adapter_meta(unet__lora_alpha="8")), "lora_alpha"),
    ):
        out = tmp_path / f"{name}.png"
        proc = run_sdc("run", *RUN, "--artifacts", build_fp32, "--lora", f, "--out", out,
                       check=False)
        assert_one_line(proc, f, needle)
        assert not out.exists()


def test_build_from_lora_refuses_bad_files(tmp_path, build_fp32):
    f = raw_file(tmp_path / "list.safetensors", b"[]")
    out = tmp_path / "out"
    proc = run_sdc("build", "--from", build_fp32, "--lora", f, "--out", out, check=False)
    assert_one_line(proc, f, "JSON list")
    assert not out.exists()


def test_build_model_lora_refuses_bad_files(tmp_path, tiny_folder):
    f = write_st(tmp_path / "r0.safetensors", kohya(rank=0))
    out = tmp_path / "out"
    proc = run_sdc("build", tiny_folder, "--precision", "fp32", "--lora", f, "--out", out,
                   check=False)
    assert_one_line(proc, f, "rank >= 1")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# checkpoints: .safetensors headers, diffusers folders, pickles


def test_single_file_checkpoint_headers(tmp_path):
    for name, f, needle in (
        ("list", raw_file(tmp_path / "list.safetensors", b"[]"), "JSON list"),
        ("empty", raw_file(tmp_path / "empty.safetensors", {}), "no tensors"),
        ("overflow", write_st(tmp_path / "of.safetensors",
                              {"model.diffusion_model.x": np.zeros(4, np.float16)},
                              edit=lambda h: h["model.diffusion_model.x"].update(
                                  shape=[2**40, 2**40], data_offsets=[0, 0])), "needs"),
        ("meta", write_st(tmp_path / "meta.safetensors", {"a": np.zeros(1, np.float16)},
                          edit=lambda h: h.__setitem__("__metadata__", {"format": 1})),
         "__metadata__"),
    ):
        out = tmp_path / f"out-{name}"
        assert_one_line(run_sdc("build", f, "--out", out, check=False), f, needle)
        assert not out.exists()


def test_diffusers_folder_weights_are_validated(tmp_path):
    from sdc.export.sources import _diffusers_weight_files

    folder = tmp_path / "model"
    for part in ("unet", "vae", "text_encoder"):
        (folder / part).mkdir(parents=True)
        write_st(folder / part / "diffusion_pytorch_model.safetensors",
                 {"a.weight": np.zeros(4, np.float32), "b.weight": np.zeros(4, np.float32)})
    assert len(_diffusers_weight_files(folder)) == 3
    bad = folder / "vae" / "diffusion_pytorch_model.safetensors"
    write_st(bad, {"a.weight": np.zeros(4, np.float32), "b.weight": np.zeros(4, np.float32)},
             edit=lambda h: h["b.weight"].update(data_offsets=[8, 24]))
    assert_sdc_error(lambda: _diffusers_weight_files(folder), bad, "overlap")


def _ckpt(path, obj):
    import torch

    torch.save(obj, path)
    return path


def test_self_referencing_checkpoint_through_the_cli(tmp_path):
    d: dict = {}
    d["state_dict"] = d
    f = _ckpt(tmp_path / "loop.ckpt", d)
    out = tmp_path / "out"
    # the timeout is the point: an endless unwrap would hang here
    proc = run_sdc("build", f, "--out", out, check=False, timeout=120)
    assert_one_line(proc, f, "contains itself")
    assert not out.exists()


def _nested(levels: int) -> dict:
    import torch

    obj: dict = {"model.diffusion_model.x": torch.zeros(1)}
    for _ in range(levels):
        obj = {"state_dict": obj, "epoch": 3}
    return obj


def _checkpoint_cases():
    import torch

    t = torch.zeros(2)
    a: dict = {}
    b: dict = {"state_dict": a}
    a["state_dict"] = b  # a two-dict cycle
    return [
        ("cycle", {"state_dict": a}, "contains itself"),
        ("deep", _nested(10), "nested more than 4 levels"),
        ("empty", {}, "no tensors"),
        ("empty-inner", {"state_dict": {}}, "no tensors"),
        ("string", {"state_dict": {"w": t, "name": "sd15"}}, "'name' is str, not a tensor"),
        ("int", {"w": t, "global_step": 470000}, "'global_step' is int"),
        ("nested", {"w": t, "ema": {"w": t}}, "'ema' is dict"),
        ("list", {"w": t, "ws": [t, t]}, "'ws' is list"),
        ("int-key", {"w": t, 3: t}, "key '3' is int"),
        ("not-dict", {"state_dict": [t]}, "found list"),
        ("tensor", t, "found Tensor"),
    ]


def test_checkpoint_contents(tmp_path):
    from sdc.export.sources import _load_pickled_weights, _shapes_of

    for name, obj, needle in _checkpoint_cases():
        f = _ckpt(tmp_path / f"{name}.ckpt", obj)
        assert_sdc_error(lambda: _load_pickled_weights(f), f, needle)
    # the usual nesting still works, and shapes come out of it
    ok = _ckpt(tmp_path / "ok.ckpt", _nested(2))
    shapes, sd = _shapes_of(ok)
    assert shapes == {"model.diffusion_model.x": [1]} and list(sd) == ["model.diffusion_model.x"]


# ---------------------------------------------------------------------------------------------
# embeddings


@pytest.mark.parametrize("tensors,needle", [
    ({"emb_params": np.zeros((0, 32), np.float32)}, "at least one vector"),
    ({"emb_params": np.zeros((2, 0), np.float32)}, "width >= 1"),
    ({"learned": np.zeros(0, np.float32)}, "[0]"),
    ({"emb_params": np.ones((2, 32), np.int32)}, "int32 values; expected float"),
    ({"emb_params": np.ones((2, 32), np.bool_)}, "bool values; expected float"),
    ({"emb_params": np.ones((2, 32), np.uint8)}, "uint8"),
    ({}, "no tensors"),
], ids=["no-vectors", "no-width", "empty-1d", "int", "bool", "uint8", "empty-file"])
def test_bad_embedding_files(tmp_path, tensors, needle):
    from sdc.fusion.embeddings import read_embedding

    f = tmp_path / "emb.safetensors"
    header, data = st_parts(tensors)
    raw_file(f, header, data)
    assert_sdc_error(lambda: read_embedding(f), f, needle)


def test_bad_embedding_header_is_the_same_parser(tmp_path):
    from sdc.fusion.embeddings import read_embedding

    f = write_st(tmp_path / "emb.safetensors", {"emb_params": np.ones((1, 32), np.float32)},
                 edit=lambda h: h["emb_params"].update(shape=[1, 33]))
    assert_sdc_error(lambda: read_embedding(f), f, "--embedding", "needs 132 bytes")


def test_bad_pt_embeddings(tmp_path):
    import torch

    from sdc.fusion.embeddings import read_embedding

    t = torch.ones(1, 32)
    for name, obj, needle in (
        ("int", {"string_to_param": {"*": torch.ones(1, 32, dtype=torch.int64)}}, "int64 values"),
        ("none", {"string_to_param": {}}, "one placeholder"),
        ("str", {"string_to_param": {"*": "vectors"}}, "is str, expected a tensor"),
        ("list", {"string_to_param": [t]}, "one placeholder"),
        ("name", {"string_to_param": {"*": t}, "name": 42}, "name is int"),
        ("mixed", {"tok": t, "step": 3}, "unrecognised .pt layout"),
        ("empty", {}, "no tensors"),
        ("tensor", t, "unrecognised .pt layout (a Tensor)"),
        ("bf16-ok", {"tok": torch.ones(2, 32, dtype=torch.bfloat16)}, None),
    ):
        f = _ckpt(tmp_path / f"{name}.pt", obj)
        if needle is None:
            assert read_embedding(f).vectors.shape == (2, 32)
        else:
            assert_sdc_error(lambda: read_embedding(f), f, needle)


def test_build_embedding_refuses_bad_files(tmp_path, tiny_folder):
    for name, tensors, needle in (
        ("width", {"emb_params": np.ones((1, 7), np.float32)}, "width"),
        ("int", {"emb_params": np.ones((1, 32), np.int32)}, "expected float"),
    ):
        f = write_st(tmp_path / f"{name}.safetensors", tensors)
        out = tmp_path / f"out-{name}"
        proc = run_sdc("build", tiny_folder, "--precision", "fp32", "--embedding", f, "--out",
                       out, check=False)
        assert_one_line(proc, f, needle)
        assert not out.exists()
