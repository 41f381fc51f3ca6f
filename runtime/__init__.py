"""Run side: torch-free (onnxruntime, numpy, tokenizers, pillow). Reads only the manifest."""
