"""Training path (torch/diffusers/peft): LoRA and embeddings feeding back into `sdc build`.

Not built yet: the training issue owns this package.
"""
