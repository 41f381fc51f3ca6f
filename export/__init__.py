"""Build side (torch): model sources, GraphSpecs, ONNX export, the parity gate, `build()`."""
