"""Torch model to deployable file, always checked: ONNX, QDQ, packed low-bit, int8 PTQ and calibration.

The package is also callable: `cifarpress.export(model, path, ...)` is cifarpress.pipeline.api.export."""
