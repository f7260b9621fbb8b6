"""Quantization: BitNet b1.58 ternary QAT (ternary), its QDQ ONNX export (qdq) and packed 2-bit artifact (packed)."""
from .packed import load_packed, read_packed_header, save_packed
from .qdq import check_qdq, export_qdq
from .ternary import (Int8Conv2d, Int8Linear, TernaryConfig, TernaryConv2d, TernaryLinear, TernaryQAT,
                      calibrate_activations, layer_report, quantize_model, quantized_layers)

__all__ = [
    "Int8Conv2d", "Int8Linear", "TernaryConfig", "TernaryConv2d", "TernaryLinear", "TernaryQAT",
    "calibrate_activations", "check_qdq", "export_qdq", "layer_report", "load_packed", "quantize_model",
    "quantized_layers", "read_packed_header", "save_packed",
]
