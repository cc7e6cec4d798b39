"""Open, check and run a model file on a runtime. Never imports torch.

`model_file.open_model` parses an ONNX file and proves its external-data references are safe;
`registry.open_session(model, Target(...))` opens it (a path, or ModelBytes already read) on any
registered runtime and returns a Session with one interface (inputs, outputs, run, runner, and
the device, providers and precision it really got): `sessions` is onnxruntime on the CPU or a GPU,
`openvino_sessions` is OpenVINO on the CPU; `target.Target` is a runtime choice as data;
`metadata` is the contract bmc writes into every model it exports (classes, input shape,
preprocessing, provenance, the runtime chosen per batch size); `preprocess` turns stored samples
into model inputs the way training did. bench, serve and compress all run models through this layer.
"""
