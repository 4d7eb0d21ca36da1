"""kiln: train an image model, export it to ONNX / TensorRT, and serve it behind a fast REST endpoint."""

__version__ = "0.1.0"
