"""Human-readable summary of a manifest (`sdc inspect`)."""

from __future__ import annotations


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _quantization_lines(q: dict) -> list[str]:
    """Per quantized graph: formats by weight count and bytes, kept layers, the search."""
    by: dict[str, list[int]] = {}
    for layer in q["layers"].values():
        n = by.setdefault(layer["format"], [0, 0])
        n[0] += 1
        n[1] += layer["bytes"]
    pad = " " * 16
    parts = ", ".join(f"{fmt} {n} weights {_size(b)}" for fmt, (n, b) in sorted(by.items()))
    lines = [f"{pad}weights: {parts}" + (f"; int4 blocks of {q['block_size']}"
                                          if q.get("block_size") else "")]
    if q.get("target_db") is not None:
        lines.append(f"{pad}quality target {q['target_db']:g} dB, achieved {q['achieved_db']:.2f} dB "
                     "(worst calibration/parity input vs the float graph)")
    st = q.get("static")
    if st:
        lines.append(f"{pad}8-bit activations: {st['quantized_nodes']} convs/linears on integer "
                     f"kernels, {st['float_nodes']} float ({st['method']}, "
                     f"{st['calibration_inputs']} calibration inputs)")
    if q.get("kept"):
        lines.append(f"{pad}kept in 16 bits: " + ", ".join(
            k.removesuffix(".weight") for k in sorted(q["kept"])))
    s = q.get("search")
    if s:
        sens = s.get("sensitivity_db") or {}
        worst = sorted(sens, key=sens.get)[:3]
        lines.append(f"{pad}search: {s['evaluations']} evaluations"
                     + ("; most sensitive " + ", ".join(f"{g} {sens[g]:.1f} dB" for g in worst)
                        if worst else "")
                     + (f"; fp16 groups: {', '.join(s['kept_fp16_groups'])}"
                        if s["kept_fp16_groups"] else ""))
    return lines


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
        if g.get("chunks"):
            c = g["chunks"]
            lines.append(f"  {'':<13} {len(c['parts'])} chunks of "
                         + " / ".join(_size(part["weight_bytes"]) for part in c["parts"])
                         + f" weights; chunk parity max_rel "
                         f"{max(x['max_rel'] for x in c['parity']['chunks']):.3g}, chained "
                         f"{c['parity']['value']:.3g} {'ok' if c['parity']['passed'] else 'FAILED'}")
        if g.get("quantization"):
            lines.extend(_quantization_lines(g["quantization"]))
        prof = (manifest.get("memory_profile") or {}).get("graphs", {}).get(stage)
        if prof:
            pt = prof["whole"]["points"][-1]
            at = f"{pt['lat']}² latents" if "lat" in pt else f"batch {pt['batch']}"
            lines.append(f"  {'':<13} measured peak {_size(pt['peak'] or 0)} at {at}, "
                         f"{pt['run_s']:.2f} s per call")
    if manifest.get("memory_profile"):
        mp = manifest["memory_profile"]
        lines.append(f"memory     baseline {_size(mp['baseline_bytes'])} (interpreter + runtime "
                     f"libraries); onnxruntime setup {_size(mp['first_session_bytes'])}, tokenizer "
                     f"{_size(mp['runtime_held_bytes'])}; `sdc run --plan` shows the plan")
    for lo in manifest.get("loras", []):
        lines.append(f"lora       {lo['name']} ({lo['format']}) weight {lo['weight']:g}, rank "
                     f"{'/'.join(map(str, lo['rank']))}, {lo['layers']} layers, fused at "
                     f"{lo.get('applied', 'build')}; triggers: {', '.join(lo['triggers']) or '-'}")
    if manifest.get("quantized_from"):
        q = manifest["quantized_from"]
        lines.append(f"quantized from {q['path']} ({q['precision']}, build key "
                     f"{q['build_key'][:12]}); LoRAs are fused there, then quantized again")
    if manifest.get("refused_from"):
        lines.append(f"re-fused from {manifest['refused_from']['path']} (parity entries are the "
                     "base build's)")
    b = manifest["build"]
    lines.append(f"built in {b['seconds']:.0f} s, peak RSS {_size(b['peak_rss_bytes'])}")
    from .verify import layout_note

    if note := layout_note(manifest):
        lines.append(note)
    return "\n".join(lines)
