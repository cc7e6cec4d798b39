"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

import json
import re

import pytest

from conftest import assert_one_line_error, run_bmc


def test_help_lists_every_command_and_version_prints(workdir):
    result = run_bmc("--help", cwd=workdir)
    assert result.returncode == 0
    for command in ("train", "compress", "export", "bench", "serve", "info"):
        assert command in result.stdout
    version = run_bmc("--version", cwd=workdir)
    assert version.returncode == 0 and version.stdout.startswith("bmc 0.")


@pytest.mark.slow
def test_train_with_no_arguments_says_where_it_saved(workdir):
    result = run_bmc("train", cwd=workdir)
    assert result.returncode == 0, result.stderr
    said = re.fullmatch(r"saved (\S+) \(test accuracy ([\d.]+%), 30 epochs in [\d.]+ s\)\n", result.stdout)
    assert said and said.group(1) == "runs/digits-seed-cifar-cnn-1", result.stdout
    assert "epoch  30" in result.stderr  # the per-epoch log next to the progress bars
    meta = json.loads((workdir / "runs" / "latest" / "bmc.json").read_text())
    assert (workdir / "runs" / "latest").resolve() == (workdir / said.group(1)).resolve()
    assert said.group(2) == f"{meta['history'][-1]['test_accuracy']:.2%}"  # what the run saved, whatever the figure

    described = run_bmc("info", "runs/latest", cwd=workdir)
    assert described.returncode == 0 and "seed-cifar-cnn" in described.stdout


@pytest.mark.slow
def test_json_summary_is_machine_readable_and_quiet_is_quiet(workdir):
    result = run_bmc("train", "--model", "seed-mlp", "--epochs", "2", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model"] == "seed-mlp" and summary["dataset"] == "digits" and summary["epochs"] == 2
    meta = json.loads((workdir / summary["run_dir"] / "bmc.json").read_text())
    assert summary["test_accuracy"] == meta["history"][-1]["test_accuracy"] and summary["test_loss"] == meta["history"][-1]["test_loss"]
    assert summary["weights_sha256"] == meta["weights"]["sha256"]
    quiet = run_bmc("train", "--epochs", "1", "--quiet", cwd=workdir)
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.parametrize(
    "args, exit_code, fragments",
    [
        (["train", "--model", "resnet2"], 2, ["unknown model 'resnet2'", "resnet20"]),
        (["train", "--dataset", "digitz"], 2, ["unknown data set 'digitz'", "digits"]),
        (["train", "--epochs", "0"], 2, ["epochs must be in [1, 100000]"]),
        (["train", "--no-such-flag"], 2, ["No such option", "--no-such-flag"]),
        (["train", "--dataset", "imagefolder", "--data-dir", "missing"], 1, ["missing: no such directory"]),
        (["train", "--dataset", "imagefolder", "--data-dir", "."], 1, ["no train/ folder in ."]),
        (["train", "--dataset", "cifar10", "--data-dir", "."], 1, ["no CIFAR-10 in .", "--download"]),
        (["train", "--model", "resnet20", "--dataset", "iris"], 1, ["CIFAR ResNets need image inputs"]),
        (["train", "--model-arg", "oops"], 2, ["--model-arg expects KEY=VALUE"]),
        (["train", "--resume", "nowhere"], 1, ["nowhere: no bmc.json"]),
        (["info", "nowhere"], 1, ["nowhere: no such run directory"]),
        (["compress"], 1, ["runs/latest does not exist", "bmc train"]),
        (["compress", "--prune", "1.2"], 2, ["prune must be in [0, 0.95]"]),
        (["train", "--resume", "nowhere", "--dataset", "iris", "--epochs", "3"], 2, ["--resume continues nowhere", "drop --dataset, --epochs"]),
        (["train", "--lr", "nan"], 2, ["lr must be in (0, 100]; got nan"]),
        (["export", "--model", "resnet20", "--num-classes", "0"], 2, ["num_classes must be in [1, 1000000]; got 0"]),
        (["train", "--label-smoothing", "nan"], 2, ["label_smoothing must be in"]),
        (["compress", "--kd-alpha", "nan"], 2, ["kd_alpha must be in [0, 1]"]),
        (["compress", "--threads", "0"], 2, ["threads must be in [1, 1024]"]),
        (["compress", "--quantize", "qat", "--finetune-epochs", "0"], 2, ["--finetune-epochs 0 leaves nothing to train"]),
        (["bench", "--csv", "/dev/null/x.csv"], 2, ["/dev/null/x.csv: /dev/null is a file, not a directory"]),
        (["serve", "nowhere.onnx"], 1, ["nowhere.onnx: no such file"]),
        (["train", "--epochs", "1", "--out", "/proc/bmc-run"], 1, ["/proc/bmc-run: No such file or directory"]),
    ],
)
def test_bad_input_is_one_line_and_the_right_exit_code(workdir, args, exit_code, fragments):
    result = run_bmc(*args, cwd=workdir)
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert_one_line_error(result, *fragments)


@pytest.mark.slow
def test_truncated_checkpoint_on_resume_is_one_line(workdir):
    # kill a run between epochs by asking for 3 epochs and truncating what it left
    first = run_bmc("train", "--epochs", "3", "--quiet", "--out", "run", cwd=workdir)
    assert first.returncode == 0
    (workdir / "run" / "train_state.safetensors").write_bytes(b"\x00" * 10)
    result = run_bmc("train", "--resume", "run", cwd=workdir)
    assert result.returncode == 1
    assert_one_line_error(result, "run/train_state.safetensors: not a readable safetensors file")


def test_debug_shows_the_traceback(workdir):
    result = run_bmc("--debug", "train", "--dataset", "imagefolder", "--data-dir", "missing", cwd=workdir)
    assert result.returncode == 1 and "Traceback" in result.stderr and "DataError" in result.stderr
