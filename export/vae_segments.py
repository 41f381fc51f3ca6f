"""The VAE decoder cut at its GroupNorms, so the runtime can tile it *exactly* (torch side).

Why cut it
    Tiling a whole decoder graph (one call per latent tile, blended) cannot match the untiled
    decode: every GroupNorm normalises with the tile's own statistics and the mid block's
    self-attention mixes only the tile, so tiles disagree with the whole image. Measured on
    random-weight SD decoders: 20-25 dB image PSNR vs untiled at 32-latent tiles, whatever the
    blend. Feeding the tiles *whole-image* GroupNorm statistics fixes it (55-83 dB measured), but
    those statistics depend on every earlier layer's output over the whole image; estimating them
    (from a first tiled pass, or a downscaled whole-image pass) was measured at 18-36 dB, because
    random decoders amplify small statistics errors layer after layer.

    So the decoder is cut into segments at its GroupNorms and run layer-wise: the runtime keeps
    each segment's whole-image output in host memory, computes the next GroupNorm's statistics
    from it in numpy, and runs the next segment tile by tile with those statistics as inputs.
    Between two GroupNorms there are at most two 3x3 convolutions (one before and one after a 2x
    nearest upsampling), so a tile needs a halo of at most 2 input pixels to see exactly what the
    untiled decode sees: the result equals the untiled decode up to float rounding, with no blend.
    The device (or ORT arena) only ever holds one tile's activations; host memory holds the
    current and next whole-image maps (SD at 512 px: at most a 256-channel 512x512 map, 256 MiB).

Segments (diffusers' AutoencoderKL decode, post_quant_conv through conv_out)
    head        post_quant_conv, conv_in, mid block (its attention is global: run untiled, at
                latent resolution where it is small: 512 ch x 64 x 64 at 512 px)
    per ResnetBlock2D of every up block, two segments:
      <r>.a     y = conv1(silu(norm1(x)))                      inputs x, norm stats of x
      <r>.b     x' = (shortcut(x) + conv2(silu(norm2(y)))) / output_scale_factor, then the block's
                upsampler (nearest 2x + conv) after its last resnet   inputs y, x, norm stats of y
    out         conv_out(silu(conv_norm_out(x)))               inputs x, norm stats of x
Each segment normalises its first input with statistics given as inputs `mean` and `var`
([batch, groups], biased variance as torch's GroupNorm uses) and the module's own eps, affine
weight and bias; the parity gate checks the whole chain against the real decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _group_norm(norm: torch.nn.GroupNorm, x, mean, var):
    b, c, h, w = x.shape
    g = norm.num_groups
    xg = x.reshape(b, g, c // g, h, w)
    y = (xg - mean[:, :, None, None, None]) * torch.rsqrt(var[:, :, None, None, None] + norm.eps)
    return y.reshape(b, c, h, w) * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


class Head(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.conv_in = vae.decoder.conv_in
        self.mid_block = vae.decoder.mid_block

    def forward(self, latent_sample):
        z = latent_sample if self.post_quant_conv is None else self.post_quant_conv(latent_sample)
        return self.mid_block(self.conv_in(z), None)


class ResnetFirstHalf(torch.nn.Module):
    def __init__(self, resnet):
        super().__init__()
        self.resnet = resnet

    def forward(self, x, mean, var):
        r = self.resnet
        return r.conv1(r.nonlinearity(_group_norm(r.norm1, x, mean, var)))


class ResnetSecondHalf(torch.nn.Module):
    def __init__(self, resnet, upsampler=None):
        super().__init__()
        self.resnet = resnet
        self.upsampler = upsampler

    def forward(self, y, x, mean, var):
        r = self.resnet
        h = r.conv2(r.nonlinearity(_group_norm(r.norm2, y, mean, var)))  # dropout: eval identity
        skip = x if r.conv_shortcut is None else r.conv_shortcut(x)
        out = (skip + h) / r.output_scale_factor
        return out if self.upsampler is None else self.upsampler(out)


class OutHalf(torch.nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, x, mean, var):
        d = self.decoder
        return d.conv_out(d.conv_act(_group_norm(d.conv_norm_out, x, mean, var)))


@dataclass
class Segment:
    """One exported piece and how the runtime runs it (all sizes relative to the latent grid)."""

    name: str  # file stem and log name: "head", "up0.r1.a", ..., "out"
    module: torch.nn.Module
    inputs: tuple[str, ...]  # spatial inputs: the first is the one normalised; then mean, var
    output: str  # the map it writes (a name later segments read)
    res: int  # input resolution in pixels per latent (1, 2, 4, 8)
    upsample: int  # output resolution / input resolution (1 or 2)
    halo: int  # input pixels of context a tile needs on each side to be exact
    groups: int  # GroupNorm groups of the normalised input; 0 for the head
    channels: int  # channels of the output

    @property
    def normalised(self) -> bool:
        return self.groups > 0


class UnsupportedDecoder(ValueError):
    pass


def _check_resnet(resnet, where: str) -> None:
    if type(resnet).__name__ != "ResnetBlock2D":
        raise UnsupportedDecoder(f"{where}: {type(resnet).__name__}, expected ResnetBlock2D")
    if resnet.upsample is not None or resnet.downsample is not None:
        raise UnsupportedDecoder(f"{where}: resampling inside the resnet")
    if resnet.time_emb_proj is not None:
        raise UnsupportedDecoder(f"{where}: time-embedding projection in a VAE resnet")
    k = resnet.conv1.kernel_size + resnet.conv2.kernel_size
    if k != (3, 3, 3, 3) or resnet.conv1.padding != (1, 1) or resnet.conv2.padding != (1, 1):
        raise UnsupportedDecoder(f"{where}: convolutions other than 3x3 with padding 1")
    if resnet.conv_shortcut is not None and resnet.conv_shortcut.kernel_size != (1, 1):
        raise UnsupportedDecoder(f"{where}: shortcut convolution other than 1x1")


def _check_upsampler(up, where: str) -> None:
    if (type(up).__name__ != "Upsample2D" or up.use_conv_transpose or not up.interpolate
            or up.norm is not None or not up.use_conv or up.conv.kernel_size != (3, 3)):
        raise UnsupportedDecoder(f"{where}: expected nearest 2x upsampling followed by a 3x3 conv")


def decoder_segments(vae) -> list[Segment]:
    """The segments of `vae`'s decode, in execution order; UnsupportedDecoder if its structure is
    not the SD1.x one the cut assumes (the caller then ships no tiled decoder)."""
    dec = vae.decoder
    if getattr(dec, "mid_block", None) is None or type(dec.conv_norm_out).__name__ != "GroupNorm":
        raise UnsupportedDecoder("decoder without a mid block or a GroupNorm output norm")
    segs = [Segment("head", Head(vae), ("latent_sample",), "h0", 1, 1, 0, 0,
                    dec.conv_in.out_channels)]
    res, current, n = 1, "h0", 0
    for b, block in enumerate(dec.up_blocks):
        if type(block).__name__ != "UpDecoderBlock2D":
            raise UnsupportedDecoder(f"up_blocks.{b}: {type(block).__name__}")
        ups = list(block.upsamplers or [])
        if len(ups) > 1:
            raise UnsupportedDecoder(f"up_blocks.{b}: {len(ups)} upsamplers")
        for r, resnet in enumerate(block.resnets):
            where = f"up_blocks.{b}.resnets.{r}"
            _check_resnet(resnet, where)
            last = r == len(block.resnets) - 1
            up = ups[0] if last and ups else None
            if up is not None:
                _check_upsampler(up, f"up_blocks.{b}.upsamplers.0")
            mid, n = f"h{n + 1}", n + 1
            segs.append(Segment(f"up{b}.r{r}.a", ResnetFirstHalf(resnet), (current,), mid, res, 1,
                                1, resnet.norm1.num_groups, resnet.conv1.out_channels))
            out, n = f"h{n + 1}", n + 1
            # conv2 needs 1 pixel of context; after the upsampling its 3x3 conv needs 1 more
            # output pixel, i.e. one more input pixel
            segs.append(Segment(f"up{b}.r{r}.b", ResnetSecondHalf(resnet, up), (mid, current), out,
                                res, 2 if up is not None else 1, 2 if up is not None else 1,
                                resnet.norm2.num_groups, resnet.conv2.out_channels))
            current = out
            if up is not None:
                res *= 2
    segs.append(Segment("out", OutHalf(dec), (current,), "sample", res, 1, 1,
                        dec.conv_norm_out.num_groups, dec.conv_out.out_channels))
    return segs


def run_untiled(segments: list[Segment], latent_sample: torch.Tensor) -> torch.Tensor:
    """The segments chained on the whole image with exact statistics (a check of the cut)."""
    return _all_maps(segments, latent_sample)[segments[-1].output]


def _all_maps(segments: list[Segment], latent_sample: torch.Tensor) -> dict[str, torch.Tensor]:
    maps = {"latent_sample": latent_sample}
    for s in segments:
        args = [maps[i] for i in s.inputs]
        if s.normalised:
            xg = args[0].reshape(args[0].shape[0], s.groups, -1)
            args += [xg.mean(-1), xg.var(-1, unbiased=False)]
        maps[s.output] = s.module(*args)
    return maps


def export_segments(vae, trace_latent: torch.Tensor, out_dir) -> list[dict]:
    """Export every segment of `vae`'s decoder to out_dir/<name>.onnx; returns the manifest
    entries (execution order). Raises UnsupportedDecoder before writing anything.

    The TorchScript exporter rather than dynamo: these are ~26 small conv graphs whose weights no
    adapter touches (LoRAs target the UNet and text encoder), and it exports each in ~0.2 s
    against ~2 s for dynamo (measured), which matters on every tiny test build.
    """
    from pathlib import Path

    from .quiet import quiet_torch_stack

    segments = decoder_segments(vae)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    with torch.no_grad():
        maps = _all_maps(segments, trace_latent.float())
        for s in segments:
            args = [maps[i] for i in s.inputs]
            names = list(s.inputs)
            axes = {n: {0: "batch", 2: "height", 3: "width"} for n in names}
            if s.normalised:
                b = args[0].shape[0]
                args += [torch.zeros(b, s.groups), torch.ones(b, s.groups)]
                names += ["mean", "var"]
                axes.update(mean={0: "batch"}, var={0: "batch"})
            axes[s.output] = {0: "batch", 2: "out_height", 3: "out_width"}
            path = out_dir / f"{s.name}.onnx"
            with quiet_torch_stack():
                torch.onnx.export(s.module, tuple(args), str(path), dynamo=False,
                                  opset_version=18, input_names=names, output_names=[s.output],
                                  dynamic_axes=axes)
            entries.append({"name": s.name, "file": path.name, "inputs": list(s.inputs),
                            "output": s.output, "res": s.res, "upsample": s.upsample,
                            "halo": s.halo, "groups": s.groups, "channels": s.channels})
    return entries
