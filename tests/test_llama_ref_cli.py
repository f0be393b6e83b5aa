"""`python -m llama_ref`, as a user runs it: offline on CPU, one-line errors for bad checkpoints."""

import os
import subprocess
import sys

import pytest

from tiny_checkpoints import make_tiny_model, write_gguf, write_llama2c, write_llama2c_tokenizer, write_meta


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "llama_ref", *args], capture_output=True, text=True,
                          timeout=600, env=env)


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
    import gguf
    import numpy as np

    path = tmp_path / "iq2.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ2_XXS][1]
    writer.add_tensor("blk.0.ffn_down.weight", np.zeros((64, block_bytes), dtype=np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, "IQ2_XXS"


@pytest.mark.parametrize("make_bad_file", [truncated_gguf, wrong_magic, vocab_mismatch, missing_params_json,
                                           other_architecture, unsupported_quantisation])
def test_bad_checkpoint_is_one_line_naming_the_file(tmp_path, make_bad_file):
    path, problem = make_bad_file(tmp_path)
    result = run_cli("--model", str(path), "--max-tokens", "1", "--device", "cpu")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert str(path) in result.stderr and problem in result.stderr


def test_unknown_device_and_dtype_are_one_line_errors():
    for args, fragment in ((["--device", "tpu"], "unknown device"), (["--dtype", "fp8"], "unknown dtype")):
        result = run_cli("--max-tokens", "1", *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert fragment in result.stderr and result.stderr.count("\n") == 1


def test_help_explains_every_option():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--model", "--prompt", "--chat", "--max-tokens", "--temperature", "--top-p", "--seed",
                   "--device", "--dtype", "--kernels", "--explain-kernels", "--cpu", "--compile"):
        assert option in result.stdout
