"""LoRA and textual-inversion fusion into base weights (fp32 math, every key matched), for every
model family sdc builds (SD1.x, SD2.x, SDXL; which components and key prefixes a family's LoRAs
and embeddings use is sdc.families')."""
