"""LoRA and textual-inversion fusion into base weights (fp32 math, every key matched).

Not built yet: the fusion issue owns this package. `sdc build --lora` is refused until it lands.
"""
