"""What is verified is what is served: manifests of every model file, bytes read once, encrypted models,
export's staging folder after a kill, and bmc.json checked against its schema. Real files, real
`bmc serve` and `bmc export` subprocesses on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bmc.errors import CheckpointError
from bmc.export import ExportConfig, export
from bmc.manifest import manifest_of_files, manifest_path, read_manifest, write_manifest
from bmc.runtime.model_file import ModelFileError, open_model
from bmc.sealed import MAGIC, SealedError, load_key, new_key, seal_files, unseal
from bmc.serve_edge import ServeConfig, integrity
from bmc.serve_edge.integrity import IntegrityError
from conftest import assert_one_line_error, run_bmc

WIDTH = 4096  # 16 KB of weights: several pages, which onnxruntime maps from a file it is given by path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    """A `bmc serve` subprocess, ready; stopped with SIGTERM (then SIGKILL) by stop()."""

    def __init__(self, *args: str, env: dict | None = None, cwd: Path | None = None):
        self.port = _free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bmc", "serve", *args, "--threads", "1", "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=cwd,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bmc serve exited {self.process.returncode}: {self.process.stderr.read()}")
            try:
                if self._request("GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("bmc serve did not become ready in 60 s")

    def _request(self, method: str, path: str, body: bytes | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def infer(self, model: str, array: np.ndarray) -> tuple[int, np.ndarray | dict]:
        body = {"inputs": [{"name": "input", "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}]}
        status, raw = self._request("POST", f"/v2/models/{model}/infer", json.dumps(body).encode())
        answer = json.loads(raw)
        if status != 200:
            return status, answer
        output = answer["outputs"][0]
        return status, np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _serve_refuses(*args: str, cwd: Path) -> str:
    """`bmc serve` must stop before listening with one line; returns it."""
    result = run_bmc("serve", *args, "--port", str(_free_port()), cwd=cwd, timeout=60)
    assert result.returncode == 1, result.stderr
    return assert_one_line_error(result)


def _scale_model(path: Path, weights: np.ndarray, external: bool = True) -> Path:
    """output = input * w: onnxruntime reads w straight from the data file it maps (no prepacked copy)."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", len(weights)])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(weights)])
    graph = helper.make_graph([helper.make_node("Mul", ["input", "w"], ["output"])], "scale", [x], [y], [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=f"{path.name}.data", size_threshold=0)
    write_manifest(path, manifest_of_files(path))
    return path


def _weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.5, 1.5, WIDTH).astype(np.float32)


def _reference(path: Path, array: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": array})[0]


# --- external data: one manifest for every file, checked and signed --------------------------------


def test_export_lists_every_file_in_its_manifest_and_tampered_external_weights_are_refused(workdir, monkeypatch):
    from bmc.export import onnx_export

    # A model over 2 GB keeps its weights in MODEL.onnx.data; a limit just over the 64 MB margin sends
    # this small one down the same path.
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT_BYTES", (64 << 20) + 1024)
    result = export(ExportConfig(model="seed-mlp", input_size=8, input_channels=1, num_classes=10, out=workdir / "mlp" / "model.onnx"))
    model, data = result.path, result.path.with_name("model.onnx.data")
    assert data.is_file()
    sidecar_text = manifest_path(model).read_text()
    assert sidecar_text == "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in (model, data))
    # One digest pins both files: the manifest's, which export reports and --sha256 takes.
    assert result.sha256 == hashlib.sha256(sidecar_text.encode()).hexdigest() and len(result.files) == 2
    assert integrity.read_verified_model(model, result.sha256).held.external_data.keys() == {"model.onnx.data"}
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "--quiet", "-c", "model.onnx.sha256"], cwd=model.parent).returncode == 0

    assert run_bmc("sign", "--new-key", str(workdir / "key"), str(model), cwd=workdir).returncode == 0
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    expected = _reference(model, x)
    server = Served(str(model), "--public-key", str(workdir / "key.pub"))
    try:
        status, output = server.infer("model", x)
        assert status == 200
        np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)
    finally:
        server.stop()

    weights = np.frombuffer(data.read_bytes(), dtype=np.float32)
    data.write_bytes((-weights).tobytes())
    line = _serve_refuses(str(model), cwd=workdir)
    assert "model.onnx.data" in line and "sha256" in line and "does not match" in line
    # Whoever can rewrite the weights can rewrite the manifest too: the signature covers both files.
    data.write_bytes(np.zeros_like(weights).tobytes())
    write_manifest(model, manifest_of_files(model))
    line = _serve_refuses(str(model), "--public-key", str(workdir / "key.pub"), cwd=workdir)
    assert "signature does not match this file and its 1 data file(s)" in line


def test_weights_overwritten_or_truncated_on_disk_after_start_change_nothing_served(workdir):
    model = _scale_model(workdir / "scale" / "scale.onnx", _weights())
    data = model.with_name("scale.onnx.data")
    x = np.ones((1, WIDTH), np.float32)
    expected = _reference(model, x)
    server = Served(str(model))
    try:
        status, before = server.infer("scale", x)
        assert status == 200
        np.testing.assert_array_equal(before, expected)
        # In place, on the same inode: what a file mapped by the runtime would show at once.
        with open(data, "r+b") as handle:
            handle.write((-_weights()).tobytes())
        status, negated = server.infer("scale", x)
        assert status == 200
        np.testing.assert_array_equal(negated, expected)
        os.truncate(data, 0)  # a mapped file cut short: the next read of its pages was SIGBUS
        status, truncated = server.infer("scale", x)
        assert status == 200 and server.process.poll() is None
        np.testing.assert_array_equal(truncated, expected)
    finally:
        server.stop()


def test_a_file_swapped_between_verification_and_session_creation_is_not_what_runs(workdir, monkeypatch):
    from bmc.serve_edge import models

    good = _scale_model(workdir / "good" / "model.onnx", _weights(0), external=False)
    evil = _scale_model(workdir / "evil" / "model.onnx", -_weights(0), external=False)
    digest = read_manifest(good).model_sha256
    x = np.ones((1, WIDTH), np.float32)
    expected = _reference(good, x)
    real_open_session = models.open_session
    swaps = []

    def swap_then_open(*args, **kwargs):
        # The attacker's best moment: the file was verified, the session is not made yet.
        if not swaps:
            os.replace(evil, good)
            swaps.append(1)
        return real_open_session(*args, **kwargs)

    monkeypatch.setattr(models, "open_session", swap_then_open)
    verified = integrity.read_verified_model(good, digest)
    loaded = models.load_model(verified, "model", ServeConfig(models=(good,), threads=1))
    assert swaps, "the hook never ran: the test would prove nothing"
    assert hashlib.sha256(good.read_bytes()).hexdigest() != digest  # the file on disk is the swapped one
    np.testing.assert_array_equal(loaded.run({"input": x})["output"], expected)
    assert loaded.sha256 == digest


def test_a_sidecar_must_name_this_file_and_list_exactly_its_files(workdir):
    model = _scale_model(workdir / "one" / "scale.onnx", _weights(), external=False)
    digest = read_manifest(model).model_sha256
    # Only the first field used to be read: a sidecar made for another file was taken for this one's.
    manifest_path(model).write_text(f"{digest}  other.onnx\n")
    line = _serve_refuses(str(model), cwd=workdir)
    assert "scale.onnx.sha256" in line and "names 'other.onnx', not 'scale.onnx'" in line
    manifest_path(model).write_text(f"{digest}\n")
    with pytest.raises(IntegrityError, match="line 1 is not a sha256 line"):
        integrity.read_verified_model(model)

    external = _scale_model(workdir / "two" / "scale.onnx", _weights())
    data_line = [line for line in manifest_path(external).read_text().splitlines() if line.endswith(".data")][0]
    model_line = f"{hashlib.sha256(external.read_bytes()).hexdigest()}  scale.onnx\n"
    manifest_path(external).write_text(model_line)  # the data file left out
    with pytest.raises(ModelFileError, match="'scale.onnx.data' is not among the files read and verified"):
        integrity.read_verified_model(external)
    (external.parent / "extra.bin").write_bytes(b"x")
    extra = f"{hashlib.sha256(b'x').hexdigest()}  extra.bin\n"
    manifest_path(external).write_text(model_line + data_line + "\n" + extra)
    with pytest.raises(ModelFileError, match="'extra.bin' was given as its data, but the model uses no such file"):
        integrity.read_verified_model(external)
    manifest_path(external).write_text(model_line + data_line + "\n" + model_line)
    with pytest.raises(IntegrityError, match="'scale.onnx' is listed twice"):
        integrity.read_verified_model(external)
    manifest_path(external).write_text(model_line + data_line.replace("scale.onnx.data", "../one/scale.onnx") + "\n")
    with pytest.raises(ModelFileError, match="points outside the model's folder"):
        integrity.read_verified_model(external)


# --- export's staging folder after a kill -----------------------------------------------------------


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export_and_never_taken_for_output(workdir):
    out = workdir / "out"
    command = [sys.executable, "-m", "bmc", "export", "--model", "resnet20", "--input-size", "32", "--num-classes", "10", "-o", str(out / "model.onnx")]
    caught = None
    for _attempt in range(5):  # the export must still be in its staging folder when it is killed
        process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while process.poll() is None:
                staged = list(out.glob(".bmc-export-*/model.onnx")) if out.is_dir() else []
                if staged:
                    process.send_signal(signal.SIGKILL)
                    caught = staged[0].parent
                    break
                time.sleep(0.002)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
        if caught is not None:
            break
        shutil.rmtree(out, ignore_errors=True)
    assert caught is not None, "no export was caught inside its staging folder in 5 tries"
    assert process.returncode == -signal.SIGKILL and caught.is_dir()
    assert not (out / "model.onnx").exists()  # a killed export published nothing

    result = run_bmc("export", "--model", "seed-mlp", "--input-size", "8", "--num-classes", "10", "-o", str(out / "model.onnx"), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.sha256"]
    assert integrity.read_verified_model(out / "model.onnx").digest == read_manifest(out / "model.onnx").model_sha256


def test_an_export_into_a_folder_another_export_is_writing_waits_instead_of_removing_its_staging(workdir):
    import select

    out = workdir / "shared"
    command = [sys.executable, "-m", "bmc", "export", "--model", "resnet20", "--input-size", "32", "--num-classes", "10", "-o", str(out / "model.onnx")]
    first = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        while not (out.is_dir() and list(out.glob(".bmc-export-*"))):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)  # held inside its staging folder until the second export is waiting
        second = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([second.stderr], [], [], 120)
        assert ready, "the second export neither waited nor failed within 120 s"
        line = second.stderr.readline()
        assert line.startswith("info: waiting for another bmc export writing into"), line + second.stderr.read()
        first.send_signal(signal.SIGCONT)
        assert first.wait(300) == 0, first.stderr.read()
        assert second.wait(300) == 0, second.stderr.read()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait()
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.sha256"]


# --- bmc.json against its schema ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("schema")
    result = run_bmc("train", "--epochs", "1", "--quiet", "--out", str(root / "run"), cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "run"


def _set(path: str, value):
    def edit(meta):
        *parents, last = path.split(".")
        target = meta
        for key in parents:
            target = target[key]
        target[last] = value

    return edit


@pytest.mark.parametrize(
    "edit, field, fragment",
    [
        (_set("model.num_classes", "10"), "model.num_classes", "must be an integer"),
        (_set("data.class_names", "0123456789"), "data.class_names", "must be a list"),
        (_set("weights.file", "../outside/model.safetensors"), "weights.file", "outside the run directory"),
        (_set("weights.file", "ABSOLUTE"), "weights.file", "outside the run directory"),
        (_set("weights.sha256", None), "weights.sha256", "the hash is required"),
        (_set("model.num_classes", 10**12), "model.num_classes", "in [1, 1000000]"),
        (_set("model.data_input_shape", [1, 100000, 100000]), "model.data_input_shape[1]", "in [1, 65536]"),
        (_set("config.epochs", "three"), "config.epochs", "must be an integer"),
    ],
    ids=["wrong-type", "string-for-list", "dotdot", "absolute", "null-hash", "1e12-classes", "huge-shape", "config-type"],
)
def test_a_hand_edited_bmc_json_fails_in_one_line_naming_the_file_and_field(trained_run, tmp_path, edit, field, fragment):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    # A real weights file outside the run, with the right hash: export used to read it without a word.
    shutil.copytree(trained_run, tmp_path / "outside")
    meta = json.loads((run / "bmc.json").read_text())
    edit(meta)
    if meta["weights"]["file"] == "ABSOLUTE":
        meta["weights"]["file"] = str(tmp_path / "outside" / "model.safetensors")
    (run / "bmc.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as raised:
        export(ExportConfig(run_dir=run, out=tmp_path / "model.onnx"))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{run / 'bmc.json'}: field {field}: ") and fragment in message, message
    assert not (tmp_path / "model.onnx").exists()


def test_a_weights_symlink_out_of_the_run_and_a_bad_file_on_the_command_line(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.copytree(trained_run, tmp_path / "outside")
    (run / "model.safetensors").unlink()
    (run / "model.safetensors").symlink_to(tmp_path / "outside" / "model.safetensors")
    with pytest.raises(CheckpointError, match="field weights.file: 'model.safetensors' resolves outside the run directory"):
        export(ExportConfig(run_dir=run, out=tmp_path / "model.onnx"))

    meta = json.loads((trained_run / "bmc.json").read_text())
    meta["model"]["input_shape"] = {"c": 1}
    (run / "bmc.json").write_text(json.dumps(meta))
    result = run_bmc("export", str(run), "-o", str(tmp_path / "model.onnx"), cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result, "bmc.json: field model.input_shape: must be a list")


# --- encrypted models at rest -------------------------------------------------------------------------


def test_an_encrypted_export_serves_only_with_its_key_and_leaves_no_plaintext(workdir):
    key = workdir / "keys" / "model.key"
    result = run_bmc(
        "export", "--model", "seed-mlp", "--input-size", "8", "--num-classes", "10", "--new-encrypt-key", str(key), "-o", str(workdir / "enc" / "model.onnx"),
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    assert key.stat().st_mode & 0o777 == 0o600 and len(load_key(key)) == 32
    sealed = workdir / "enc" / "model.onnx"
    assert sorted(p.name for p in sealed.parent.iterdir()) == ["model.onnx", "model.onnx.sha256"]
    assert sealed.read_bytes().startswith(MAGIC)
    # The same export in plaintext (same seed, same weights): none of its weights may be in the sealed file.
    plain = export(ExportConfig(model="seed-mlp", input_size=8, num_classes=10, out=workdir / "plain" / "model.onnx")).path
    initializer = max(onnx.load(str(plain)).graph.initializer, key=lambda t: len(t.raw_data))
    assert len(initializer.raw_data) > 1000 and initializer.raw_data[:64] not in sealed.read_bytes()
    with pytest.raises(ModelFileError, match="encrypted by bmc export --encrypt-key-file"):
        open_model(sealed)
    assert_one_line_error(run_bmc("bench", str(sealed), cwd=workdir), "encrypted")

    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    scratch = workdir / "tmp"
    scratch.mkdir()
    before = {p.name: p.stat().st_mtime_ns for p in sealed.parent.iterdir()}
    server = Served(str(sealed), "--decrypt-key-file", str(key), env={"TMPDIR": str(scratch)}, cwd=scratch)
    try:
        status, output = server.infer("model", x)
        assert status == 200
        np.testing.assert_allclose(output, _reference(plain, x), rtol=1e-5, atol=1e-5)
    finally:
        server.stop()
    # Decrypted in memory only: nothing written beside the model, and nothing holding any of its weights
    # in the working directory or TMPDIR (onnxruntime's telemetry leaves a 51-byte `.ses` id file there).
    assert {p.name: p.stat().st_mtime_ns for p in sealed.parent.iterdir()} == before
    for written in (p for p in scratch.rglob("*") if p.is_file()):
        assert written.stat().st_size < 4096 and initializer.raw_data[:64] not in written.read_bytes(), written

    assert "give bmc serve --decrypt-key-file KEY" in _serve_refuses(str(sealed), cwd=workdir)
    other = new_key(workdir / "keys" / "other.key")
    assert "encrypted with another key" in _serve_refuses(str(sealed), "--decrypt-key-file", str(other), cwd=workdir)
    assert "not encrypted, but --decrypt-key-file was given" in _serve_refuses(str(plain), "--decrypt-key-file", str(key), cwd=workdir)
    # Modified, with a sidecar rewritten to match: the key's authentication still refuses it.
    tampered = bytearray(sealed.read_bytes())
    tampered[-100] ^= 0x01
    sealed.write_bytes(bytes(tampered))
    write_manifest(sealed, manifest_of_files(sealed))
    assert "authentication failed" in _serve_refuses(str(sealed), "--decrypt-key-file", str(key), cwd=workdir)


def test_the_sealed_format_authenticates_model_data_and_header_together(tmp_path):
    model = _scale_model(tmp_path / "plain" / "scale.onnx", _weights())
    data = model.with_name("scale.onnx.data")
    key_path = new_key(tmp_path / "key")
    key = load_key(key_path)
    target = tmp_path / "sealed.onnx"
    seal_files(target, [("scale.onnx", model), ("scale.onnx.data", data)], key)
    sealed = target.read_bytes()
    held = unseal(target, sealed, key)
    assert held.model == model.read_bytes() and bytes(held.external_data["scale.onnx.data"]) == data.read_bytes()
    assert model.read_bytes() not in sealed and data.read_bytes()[:64] not in sealed

    header_end = 14 + int.from_bytes(sealed[10:14], "little")
    model_bytes = model.stat().st_size
    corrupt = {
        "header": header_end - 30,  # inside the file list: a nonce, a size or a name
        "model": header_end + 5,
        "data": header_end + model_bytes + 16 + 100,
        "tag": len(sealed) - 1,
    }
    for where, offset in corrupt.items():
        changed = bytearray(sealed)
        changed[offset] ^= 0x01
        with pytest.raises(SealedError, match="authentication failed|malformed header|truncated or extended"):
            unseal(target, bytes(changed), key)
    with pytest.raises(SealedError, match="truncated or extended"):
        unseal(target, sealed[:-1], key)
    with pytest.raises(SealedError, match="truncated or extended"):
        unseal(target, sealed + b"\0", key)
    with pytest.raises(SealedError, match="format version 2"):
        unseal(target, sealed[:8] + (2).to_bytes(2, "little") + sealed[10:], key)

    # Served from the sealed file: the data file is decrypted in memory and found by its location.
    write_manifest(target, manifest_of_files(target))
    verified = integrity.read_verified_model(target, decrypt_key=key)
    assert verified.encrypted and set(verified.held.external_data) == {"scale.onnx.data"}
    from bmc.serve_edge.models import load_model

    x = np.ones((1, WIDTH), np.float32)
    served = load_model(verified, "sealed", ServeConfig(models=(target,), threads=1))
    np.testing.assert_array_equal(served.run({"input": x})["output"], _reference(model, x))
