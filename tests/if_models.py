"""A tiny DeepFloyd IF for tests: the real diffusers/transformers classes at tiny size.

Two diffusers folders, as IF ships them:
  stage I   (IFPipeline): T5 encoder + tokenizer, a 16 px pixel UNet (3 in, 6 out: learned
            variance; `encoder_hid_dim` text projection, `addition_embed_type="text"`,
            SimpleCrossAttn blocks with added-KV attention, scale-shift resnets), a DDPM scheduler
            with `learned_range` variance and dynamic thresholding
  stage II  (IFSuperResolutionPipeline): a 64 px super-resolution UNet (6 in: noisy image +
            upscaled stage I image; `class_embed_type="timestep"` for the noise level), its DDPM
            scheduler and the `image_noising_scheduler` that noises the upscaled image
The structure follows diffusers' own IF test components (tests/pipelines/deepfloyd_if) with
stage I at 16 px and stage II at 64 px, the real cascade's 4x. The scheduler settings are the
published IF ones (squaredcos_cap_v2, learned_range, thresholding 0.95, sample_max_value 1.5 for
stage I and 1.0 for stage II).

The tokenizer is a T5-style Unigram tokenizer (`tokenizers`, Metaspace, `</s>` appended, `<pad>`
id 0) over a small word list: no T5 vocabulary can be downloaded here, and the runtime reads the
same tokenizer.json a real IF folder's T5TokenizerFast writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdc.export.quiet import quiet_torch_stack

WORDS = ("a photo of the an sks seal emblem red white blue green yellow black circle square "
         "triangle on background with and dog cat in style painting").split()
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"

SCHEDULER_I = {
    "_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001, "clip_sample": True, "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.95, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.5, "thresholding": True,
    "variance_type": "learned_range",
}
SCHEDULER_II = {**SCHEDULER_I, "sample_max_value": 1.0}
NOISING_SCHEDULER = {
    "_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001, "clip_sample": True, "clip_sample_range": 1.0,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "variance_type": "fixed_small",
}


def write_t5_tokenizer(out: Path) -> int:
    """A T5-style tokenizer folder (tokenizer.json + config); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -6.0) for c in CHARS] + [("\u2581" + c, -5.0) for c in CHARS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", extra_ids=0, model_max_length=77)
    fast.save_pretrained(str(out))
    return len(vocab)


def t5_config(vocab_size: int) -> dict:
    """T5 v1.1's structure (gated-gelu, no bias, relative attention) at width 32."""
    return {"vocab_size": vocab_size, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2,
            "num_heads": 4, "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 20, "feed_forward_proj": "gated-gelu",
            "is_encoder_decoder": False, "use_cache": False, "dropout_rate": 0.0,
            "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1}


def unet_i_config(hidden: int) -> dict:
    return {
        "sample_size": 16, "in_channels": 3, "out_channels": 6, "layers_per_block": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        "cross_attention_dim": 32, "encoder_hid_dim": hidden, "attention_head_dim": 8,
        "addition_embed_type": "text", "addition_embed_type_num_heads": 2,
        "cross_attention_norm": "group_norm", "resnet_time_scale_shift": "scale_shift",
        "act_fn": "gelu", "norm_num_groups": 8,
    }


def unet_ii_config(hidden: int) -> dict:
    return {
        **unet_i_config(hidden), "sample_size": 64, "in_channels": 6,
        "block_out_channels": [16, 32, 64],
        "down_block_types": ["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D",
                             "SimpleCrossAttnDownBlock2D"],
        "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D",
                           "ResnetUpsampleBlock2D"],
        "class_embed_type": "timestep", "mid_block_scale_factor": 1.414,
        "time_embedding_act_fn": "gelu", "resnet_skip_time_act": True,
        "resnet_out_scale_factor": 1.414,
    }


def _scheduler(folder: Path, name: str, config: dict) -> None:
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _index(folder: Path, cls: str, parts: dict) -> None:
    index = {"_class_name": cls, "_diffusers_version": "0.42.1",
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "watermarker": [None, None], "requires_safety_checker": False, **parts}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_if_folders(root: Path, seed: int = 5) -> tuple[Path, Path]:
    """(stage I folder, stage II folder) under `root`: tiny IF-I and IF-II diffusers folders."""
    root = Path(root)
    (root / "IF-I-tiny").mkdir(parents=True, exist_ok=True)
    vocab = write_t5_tokenizer(root / "IF-I-tiny" / "tokenizer")
    t5 = t5_config(vocab)
    one, two, _ = write_if_folders(root / "IF-I-tiny", root / "IF-II-tiny", {
        "t5": t5, "unet_i": unet_i_config(t5["d_model"]),
        "unet_ii": unet_ii_config(t5["d_model"])}, seed)
    return one, two


def write_if_folders(one: Path, two: Path, configs: dict, seed: int) -> tuple[Path, Path, dict]:
    """IF-I and IF-II diffusers folders from `configs` {"t5", "unet_i", "unet_ii"} with random
    weights (seeded), this module's tokenizer and IF's schedulers; also {module: parameters}.
    (bench/deepfloyd_fullsize.py writes the full-size architectures with it.)"""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    for folder in (one, two):
        folder.mkdir(parents=True, exist_ok=True)
    vocab = write_t5_tokenizer(one / "tokenizer")
    write_t5_tokenizer(two / "tokenizer")
    if vocab > configs["t5"]["vocab_size"]:
        raise ValueError(f"the tokenizer's {vocab} ids exceed the T5's vocab_size")
    counts = {"tokenizer_vocab": vocab}

    def save(module, path, key):
        counts[key] = sum(p.numel() for p in module.parameters())
        module.save_pretrained(path, safe_serialization=True)

    with quiet_torch_stack():
        torch.manual_seed(seed)
        save(T5EncoderModel(T5Config(**configs["t5"])), one / "text_encoder", "text_encoder")
        save(UNet2DConditionModel(**configs["unet_i"]), one / "unet", "unet_i")
        save(UNet2DConditionModel(**configs["unet_ii"]), two / "unet", "unet_ii")
    _scheduler(one, "scheduler", SCHEDULER_I)
    _scheduler(two, "scheduler", SCHEDULER_II)
    _scheduler(two, "image_noising_scheduler", NOISING_SCHEDULER)
    _index(one, "IFPipeline", {"text_encoder": ["transformers", "T5EncoderModel"],
                               "tokenizer": ["transformers", "T5TokenizerFast"],
                               "unet": ["diffusers", "UNet2DConditionModel"],
                               "scheduler": ["diffusers", "DDPMScheduler"]})
    _index(two, "IFSuperResolutionPipeline", {
        "text_encoder": [None, None], "tokenizer": ["transformers", "T5TokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "image_noising_scheduler": ["diffusers", "DDPMScheduler"]})
    return one, two, counts


def load_if_pipelines(one: Path, two: Path):
    """diffusers' IFPipeline and IFSuperResolutionPipeline for the tiny folders (fp32, CPU, no
    safety checker or watermark; stage II shares stage I's T5)."""
    import torch
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    with quiet_torch_stack():
        first = IFPipeline.from_pretrained(
            str(one), safety_checker=None, feature_extractor=None, watermarker=None,
            requires_safety_checker=False, torch_dtype=torch.float32, local_files_only=True)
        second = IFSuperResolutionPipeline.from_pretrained(
            str(two), text_encoder=first.text_encoder, safety_checker=None,
            feature_extractor=None, watermarker=None, requires_safety_checker=False,
            torch_dtype=torch.float32, local_files_only=True)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    return first, second


IF_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def make_if_lora(one: Path, two: Path, out: Path, stage: str, seed: int, rank: int = 4,
                 alpha: float = 8.0, scale: float = 0.3, stage_metadata: bool = True) -> Path:
    """A diffusers/peft LoRA for the tiny IF's stage I (`stage="unet"`) or stage II
    (`"unet_2"`), saved by IFPipeline / IFSuperResolutionPipeline.save_lora_weights (keys
    `unet.*`); with `stage_metadata` sdc's `sdc_stage` names the stage it is for."""
    import torch
    from diffusers import IFPipeline, IFSuperResolutionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    first, second = load_if_pipelines(one, two)
    unet = first.unet if stage == "unet" else second.unet
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=IF_LORA_TARGETS,
                                init_lora_weights=False))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    out.mkdir(parents=True, exist_ok=True)
    cls = IFPipeline if stage == "unet" else IFSuperResolutionPipeline
    name = f"if-{stage}-{seed}.safetensors"
    with quiet_torch_stack():
        cls.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                              weight_name=name)
    if stage_metadata:
        from safetensors import safe_open

        with safe_open(str(out / name), framework="pt") as f:
            meta = dict(f.metadata() or {})
        save_file(load_file(str(out / name)), str(out / name), metadata={**meta, "sdc_stage": stage})
    return out / name
