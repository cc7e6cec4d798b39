"""Open, check and run a model file on a runtime. Never imports torch.

`model_file.open_model` parses an ONNX file and proves its external-data references are safe;
`sessions.create_session` opens it in onnxruntime on the CPU or a GPU and reports the providers the
session really got; `metadata` is the contract bmc writes into every model it exports (classes,
input shape, preprocessing, provenance); `preprocess` turns stored samples into model inputs the way
training did. bench, serve and compress all run models through this layer.
"""
