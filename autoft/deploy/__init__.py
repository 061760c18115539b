"""Delivery: the verified ONNX export, onnxruntime inference, autoft predict and autoft serve."""
