"""Human-readable summary of a manifest (`sdc inspect`)."""

from __future__ import annotations


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def describe(manifest: dict) -> str:
    base = manifest["base_model"]
    m = manifest["model"]
    lines = [
        f"model      {base['name']} ({base['kind']}, {base['family']})"
        + ("  [built-in]" if base.get("builtin") else ""),
        f"precision  {manifest['precision']}   build key {manifest['build_key'][:12]}   "
        f"sdc {manifest['versions']['sdc']}, torch {manifest['versions']['torch']}",
        f"latents    {m['latent_channels']} ch, 1/{m['vae_scale_factor']} of pixels, sizes multiple of "
        f"{m['unet_multiple']}; scaling {m['scaling_factor']}; {m['prediction_type']}",
        f"pipeline   {' -> '.join(manifest['pipeline'])}   scheduler {manifest['scheduler']['class']}",
        *([f"defaults   " + ", ".join(f"{k} {v}" for k, v in manifest["defaults"].items())
           + " (the model's own; sdc run flags override)"] if manifest.get("defaults") else []),
        "graphs:",
    ]
    for stage, g in manifest["graphs"].items():
        size = sum(manifest["files"][f]["bytes"] for f in g["files"])
        p = g["parity"]
        op = "<=" if p["metric"] == "max_rel" else ">="
        ins = ", ".join(f"{t['name']}{t['shape']}" for t in g["inputs"])
        outs = ", ".join(f"{t['name']}{t['shape']}" for t in g["outputs"])
        lines.append(f"  {stage:<13} {g['precision']}  {_size(size):>9}  parity {p['metric']} "
                     f"{p['value']:.3g} {op} {p['threshold']} {'ok' if p['passed'] else 'FAILED'}")
        lines.append(f"  {'':<13} {ins} -> {outs}")
        if g.get("tiled"):
            t = g["tiled"]
            lines.append(f"  {'':<13} exact tiled decode: {len(t['segments'])} segments, parity "
                         f"max_rel {t['parity']['value']:.3g} "
                         f"{'ok' if t['parity']['passed'] else 'FAILED'}")
    for lo in manifest.get("loras", []):
        lines.append(f"lora       {lo['name']} ({lo['format']}) weight {lo['weight']:g}, rank "
                     f"{'/'.join(map(str, lo['rank']))}, {lo['layers']} layers, fused at "
                     f"{lo.get('applied', 'build')}; triggers: {', '.join(lo['triggers']) or '-'}")
    if manifest.get("refused_from"):
        lines.append(f"re-fused from {manifest['refused_from']['path']} (parity entries are the "
                     "base build's)")
    b = manifest["build"]
    lines.append(f"built in {b['seconds']:.0f} s, peak RSS {_size(b['peak_rss_bytes'])}")
    return "\n".join(lines)
