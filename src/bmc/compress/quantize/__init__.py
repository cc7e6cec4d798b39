"""int8 by measurement: recipes for this CPU (recipes), calibration samples and the pre-processed
model (calibration), the candidate search with its accuracy fallback (search: quantize_int8), the
per-layer sensitivity scan (sensitivity), value-preserving ONNX rewrites (rewrites), where a model's
multiply-accumulates go (compute: whether dynamic int8 is tried). No torch here.
The stage that uses them is bmc.compress.int8."""
