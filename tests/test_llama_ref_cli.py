"""`python -m llama_ref`, as a user runs it: offline on CPU, one-line errors for bad checkpoints."""

import os
import subprocess
import sys

import pytest
from tiny_checkpoints import (
    make_tiny_model,
    write_gguf,
    write_llama2c,
    write_llama2c_tokenizer,
    write_meta,
    write_unsupported_gguf,
)


def run_cli(*args, python_options=()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, *python_options, "-m", "llama_ref", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.slow
def test_default_model_streams_a_story_and_reports_speed():
    result = run_cli("--prompt", "Once upon a time", "--max-tokens", "16", "--seed", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time")
    assert len(result.stdout.split()) > 6  # the prompt plus generated words
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("achieved tok/s: ") and float(last.split(": ")[1]) > 0


def truncated_gguf(tmp_path):
    path = write_gguf(make_tiny_model(tmp_path), tmp_path / "tiny.gguf")
    path.write_bytes(path.read_bytes()[:4000])
    return path, "truncated or corrupt"


def wrong_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<!DOCTYPE html><html>404 Not Found</html>")
    return path, "not a GGUF file"


def vocab_mismatch(tmp_path):
    model = make_tiny_model(tmp_path)
    path = write_llama2c(model, tmp_path / "model.bin", version=1)
    write_llama2c_tokenizer(model, tmp_path / "tokenizer.bin", drop_last=12)
    return path, "tokens"


def missing_params_json(tmp_path):
    directory = write_meta(make_tiny_model(tmp_path), tmp_path / "llama" / "7B")
    (directory / "params.json").unlink()
    return directory, "params.json"


def other_architecture(tmp_path):
    return write_gguf(make_tiny_model(tmp_path), tmp_path / "phi3.gguf", architecture="phi3"), "phi3"


def unsupported_quantisation(tmp_path):
    return write_unsupported_gguf(tmp_path / "iq2.gguf"), "IQ2_XXS"


@pytest.mark.slow  # six runs of the CLI: make test, not test-fast (test_checkpoints checks each file in-process)
@pytest.mark.parametrize(
    "make_bad_file",
    [truncated_gguf, wrong_magic, vocab_mismatch, missing_params_json, other_architecture, unsupported_quantisation],
)
def test_bad_checkpoint_is_one_line_naming_the_file(tmp_path, make_bad_file):
    path, problem = make_bad_file(tmp_path)
    result = run_cli("--model", str(path), "--max-tokens", "1", "--device", "cpu")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert str(path) in result.stderr and problem in result.stderr


@pytest.mark.slow  # a sweep or subprocesses that load a model: make test, not test-fast
def test_unknown_device_and_dtype_are_one_line_errors():
    for args, fragment in ((["--device", "tpu"], "unknown device"), (["--dtype", "fp8"], "unknown dtype")):
        result = run_cli("--max-tokens", "1", *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert fragment in result.stderr and result.stderr.count("\n") == 1


def test_help_explains_every_option():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in (
        "--model",
        "--prompt",
        "--chat",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--seed",
        "--device",
        "--dtype",
        "--kernels",
        "--explain-kernels",
        "--cpu",
        "--compile",
    ):
        assert option in result.stdout


def test_serve_beyond_loopback_without_a_key_is_refused_before_loading(tmp_path):
    env_free = {k: v for k, v in os.environ.items() if k != "EXPLAINER_API_KEY"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_ref",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--model",
            str(tmp_path / "missing.gguf"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env_free,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "not a loopback address" in result.stderr
    assert "missing.gguf" not in result.stderr  # the address is checked before the model


def test_serve_with_a_missing_model_is_one_line_naming_it(tmp_path):
    result = run_cli("serve", "--port", "0", "--model", str(tmp_path / "missing.gguf"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "missing.gguf" in result.stderr


def test_serve_help_names_its_options_without_importing_torch():
    result = run_cli("serve", "--help", python_options=("-X", "importtime"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m llama_ref serve")
    for option in (
        "--model",
        "--host",
        "--port",
        "--api-key",
        "--max-seq-len",
        "--max-batch-size",
        "--max-body-bytes",
        "--dtype",
    ):
        assert option in result.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "llama_ref.serve" in imported and "torch" not in imported  # --help answers at once
    # the generator's help points to it
    assert "python -m llama_ref serve --help" in " ".join(run_cli("--help").stdout.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "--port must be at most 65535"),
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
        (["--port", "eight"], "argument --port: invalid int value: 'eight'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_bad_serve_argument_is_one_line_after_the_usage(args, message):
    result = run_cli("serve", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("usage: python -m llama_ref serve")
    assert lines[-1] == f"python -m llama_ref serve: error: {message}"
