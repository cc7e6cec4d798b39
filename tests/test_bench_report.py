"""What bench's report shows a user: short labels that tell files apart."""

from __future__ import annotations

from bmc.bench.report import short_names


def test_plot_labels_are_stems_and_repeated_stems_take_the_folder_that_differs():
    paths = ["runs/latest/model.onnx", "runs/latest/compressed/pruned-run/model.onnx", "r18.onnx", "runs/latest/compressed/model-int8.onnx"]
    assert short_names(paths) == ["model", "pruned-run", "r18", "model-int8"]


def test_plot_labels_fall_back_to_the_path_where_folders_repeat_too():
    paths = ["a/run/model.onnx", "b/run/model.onnx", "c/model.onnx"]
    names = short_names(paths)
    assert names[2] == "model" and len(set(names)) == 3
    assert names[:2] == ["a/run/model", "b/run/model"]
