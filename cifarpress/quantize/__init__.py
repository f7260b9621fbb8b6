"""Quantization: BitNet b1.58 ternary QAT (ternary), its QDQ ONNX export (qdq), the packed 2-bit artifact (packed),
and INT8 post-training quantization to a TensorRT-ready QDQ graph (int8)."""
from .int8 import check_int8_rules, export_int8_qdq
from .packed import load_packed, read_packed_header, save_packed
from .qdq import check_qdq, export_qdq
from .ternary import (Int8Conv2d, Int8Linear, TernaryConfig, TernaryConv2d, TernaryLinear, TernaryQAT,
                      calibrate_activations, layer_report, quantize_model, quantized_layers)

__all__ = [
    "Int8Conv2d", "Int8Linear", "TernaryConfig", "TernaryConv2d", "TernaryLinear", "TernaryQAT",
    "calibrate_activations", "check_int8_rules", "check_qdq", "export_int8_qdq", "export_qdq", "layer_report", "load_packed", "quantize_model",
    "quantized_layers", "read_packed_header", "save_packed",
]
