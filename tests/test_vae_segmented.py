"""Exact tiled VAE decode: the decoder cut at its GroupNorms (sdc.export.vae_segments) run tile by
tile by the runtime (sdc.runtime.vae_segmented), against the untiled diffusers decode.

The issue's bar is tiled vs untiled PSNR >= 35 dB at 512 px-equivalent and odd sizes, plus no
visible seam. The segmented decode is exact by construction (whole-image GroupNorm statistics,
halos as wide as the convolutions' reach, no blending), so these tests hold it to far more than
35 dB: float32 rounding only, max_rel <= 1e-5 against the untiled decode's range (the fp32 parity
gate uses 1e-4; the chained segments measure 2e-6 to 7e-6). The same decoder and latents as the
blended-tile tests in test_vae_tiling.py, where the whole-graph tiles reach only 20-24 dB.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_sdc
from test_vae_tiling import F, SIZES, image_psnr, latents_for, seam_score
from sdc.runtime.vae_segmented import decode_segmented, group_stats
from sdc.runtime.vae_tiling import plan_tiles

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdc.export.vae_segments import (UnsupportedDecoder, decoder_segments,  # noqa: E402
                                     export_segments, run_untiled)

MAX_REL = 1e-5


@pytest.fixture(scope="module")
def vae():
    from test_vae_tiling import _small_vae

    return _small_vae()


def _entries_and_runner(vae):
    """Manifest-like entries and a runner calling the torch segment modules directly."""
    segments = decoder_segments(vae)
    mods = {s.name: s for s in segments}

    def run(name, feeds):
        s = mods[name]
        names = list(s.inputs) + (["mean", "var"] if s.normalised else [])
        with torch.no_grad():
            return s.module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]).numpy()

    entries = [{"name": s.name, "inputs": list(s.inputs), "output": s.output, "res": s.res,
                "upsample": s.upsample, "halo": s.halo, "groups": s.groups} for s in segments]
    return entries, run


def _untiled(vae, z):
    with torch.no_grad():
        return vae.decode(torch.from_numpy(z)).sample.numpy()


def test_segments_chain_to_the_decoder(vae):
    z = np.random.default_rng(0).standard_normal((2, 4, 12, 20)).astype(np.float32)
    with torch.no_grad():
        out = run_untiled(decoder_segments(vae), torch.from_numpy(z)).numpy()
    ref = _untiled(vae, z)
    assert np.abs(out - ref).max() / np.abs(ref).max() <= MAX_REL


@pytest.mark.parametrize("kind", ["blurred", "encoded"])
@pytest.mark.parametrize("h,w", SIZES)
def test_exact_tiles_match_untiled(vae, kind, h, w):
    entries, run = _entries_and_runner(vae)
    z = latents_for(kind, vae, h, w)
    ref = _untiled(vae, z)
    for tile in (32, 13):  # the default, and one that divides neither size
        out = decode_segmented(run, entries, z, tile)
        rel = np.abs(out - ref).max() / np.abs(ref).max()
        psnr = image_psnr(out, ref)
        print(f"segmented {kind} {h}x{w} tile {tile}: max_rel {rel:.2e}, {psnr:.1f} dB")
        assert rel <= MAX_REL and psnr >= 35.0, (tile, rel, psnr)


@pytest.mark.parametrize("h,w", SIZES)
def test_exact_tiles_leave_no_seam(vae, h, w):
    # the same detector and margin as for blended tiles (test_vae_tiling.py); here the tile
    # borders are those of the 32-latent grid the segments run on
    entries, run = _entries_and_runner(vae)
    z = latents_for("blurred", vae, h, w)
    out, ref = decode_segmented(run, entries, z, 32), _untiled(vae, z)
    plan = plan_tiles(h, w, 32, 0.0)
    grid = type(plan)(tile=32, overlap=0, ys=tuple(range(0, h, 32)), xs=tuple(range(0, w, 32)))
    # starts on the 32 grid: the last tile is shorter, which seam_score reads as its own border
    bar = max(1.0, seam_score(ref, grid))
    assert seam_score(out, grid) <= 1.5 * bar


def test_tile_zero_is_one_call_per_segment(vae):
    entries, run = _entries_and_runner(vae)
    calls = []
    z = np.random.default_rng(1).standard_normal((1, 4, 16, 24)).astype(np.float32)
    decode_segmented(lambda n, f: calls.append(n) or run(n, f), entries, z, 0)
    assert calls == [e["name"] for e in entries]


def test_group_stats_is_float64_accurate():
    # a large mean against a small spread: the case where E[x^2] - E[x]^2 in float32 fails
    x = (np.random.default_rng(2).standard_normal((2, 16, 40, 40)) * 0.01 + 300).astype(np.float32)
    mean, var = group_stats(x, 4)
    ref = x.astype(np.float64).reshape(2, 4, -1)
    np.testing.assert_allclose(mean, ref.mean(-1), rtol=1e-7)
    np.testing.assert_allclose(var, ref.var(-1), rtol=1e-4)
    with pytest.raises(ValueError, match="groups"):
        group_stats(x, 5)


def test_unknown_decoder_structure_is_refused():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]).eval()
    with pytest.raises(UnsupportedDecoder, match="AttnUpDecoderBlock2D"):
        decoder_segments(vae)
    with pytest.raises(UnsupportedDecoder):
        export_segments(vae, torch.zeros(1, 4, 4, 4), "/nonexistent/never-written")


# ---------------------------------------------------------------------------------------------
# through a build and the CLI


def test_build_ships_a_gated_tiled_decoder(build_fp32):
    graph = json.loads((build_fp32 / "manifest.json").read_text())["graphs"]["vae_decoder"]
    tiled = graph["tiled"]
    assert tiled["parity"]["passed"] and tiled["parity"]["value"] <= 1e-4
    assert [c["case"] for c in tiled["parity"]["cases"]] == ["square", "non_square"]
    assert tiled["segments"][0]["name"] == "head" and tiled["segments"][-1]["name"] == "out"
    assert {s["file"] for s in tiled["segments"]} == set(tiled["files"])
    assert not any("/tiled/" in f for f in graph["files"])  # the whole graph's files only


def test_cli_tiled_decode_equals_untiled(build_fp32, tmp_path):
    # 16 x 24 latents in 8-latent tiles: 2 x 3 tiles at every level, two seams per axis
    imgs = {}
    for tile in (0, 8):
        out = tmp_path / f"t{tile}.png"
        proc = run_sdc("run", "a cat", "--artifacts", build_fp32, "--steps", "2", "--seed", "3",
                       "--width", "192", "--height", "128", "--vae-tile", tile, "--out", out)
        if tile:
            assert "exact 8-latent tiles" in proc.stdout + proc.stderr
        from PIL import Image

        imgs[tile] = np.asarray(Image.open(out)).astype(int)
    assert np.abs(imgs[0] - imgs[8]).max() <= 1  # uint8 rounding of float-rounding differences
