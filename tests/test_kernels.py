"""The kernel table (llama_ref.kernels): which kernel each layer gets on each CPU class, decided on faked CPU
flags; that LLAMA_REF_CPU=avx2 really runs AVX2's kernels; that quantized layers keep no float copy; and that
every --dtype and --kernels option runs, or says in one line why not."""

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from tiny_checkpoints import make_tiny_model, write_gguf  # noqa: E402

from llama_ref import Llama, kernels  # noqa: E402
from llama_ref.__main__ import main  # noqa: E402
from llama_ref.kernels import Cpu, KernelError, cpu_class, plan  # noqa: E402
from llama_ref.loading import layer_counts  # noqa: E402
from llama_ref.model import ModelArgs  # noqa: E402
from llama_ref.quantize import Int8DotLinear, Int8Embedding, Int8Linear  # noqa: E402

# /proc/cpuinfo flags of the CPU classes our hosts and users have (abridged to what decides)
ZEN3 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
ICELAKE = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
ZEN4 = ICELAKE | {"avx512_bf16"}
SAPPHIRE_RAPIDS = ICELAKE | {"amx_bf16", "amx_int8", "amx_tile"}
ALDER_LAKE = ZEN3 | {"avx_vnni"}
GRAVITON3 = {"fp", "asimd", "asimddp", "i8mm", "bf16", "sve"}


@pytest.mark.parametrize(
    "machine,flags,expected",
    [
        ("x86_64", ZEN3, "avx2"),
        ("x86_64", ICELAKE, "vnni"),
        ("x86_64", ALDER_LAKE, "vnni"),
        ("x86_64", ZEN4, "avx512-bf16"),
        ("x86_64", SAPPHIRE_RAPIDS, "avx512-bf16"),
        ("x86_64", {"sse4_2", "avx"}, "generic"),
        ("aarch64", GRAVITON3, "arm64"),
        ("arm64", set(), "arm64"),
        ("riscv64", set(), "generic"),
    ],
)
def test_the_class_comes_from_the_cpus_flags(machine, flags, expected):
    assert cpu_class(Cpu.from_flags(machine, flags)) == expected


def test_a_forced_class_caps_the_cpu_and_never_raises_it():
    assert cpu_class(Cpu.from_flags("x86_64", ZEN4, forced="avx2")) == "avx2"
    assert cpu_class(Cpu.from_flags("x86_64", ZEN4, forced="vnni")) == "vnni"
    assert cpu_class(Cpu.from_flags("x86_64", ZEN3, forced="avx512-bf16")) == "avx2"


def all_available(kernel, device_type, dtype):
    return None


def kernels_of(layer_plan):
    return {role: choice.kernel for role, choice in layer_plan.choices.items()}


@pytest.mark.parametrize(
    "flags,dtype,expected",
    [
        (ZEN3, torch.float32, {"linear": "w7a8", "small": "float", "output": "w7a8", "embedding": "int8-weights"}),
        (ICELAKE, torch.float32, {"linear": "w8a8", "small": "float", "output": "w8a8", "embedding": "int8-weights"}),
        (
            ZEN4,
            torch.bfloat16,
            {"linear": "w8a8", "small": "bf16-blocked", "output": "bf16-blocked", "embedding": "int8-weights"},
        ),
        (
            {"sse4_2"},
            torch.float32,
            {"linear": "float", "small": "float", "output": "float", "embedding": "int8-weights"},
        ),
    ],
)
def test_each_class_gets_its_row_of_the_table(flags, dtype, expected):
    assert kernels_of(plan("cpu", dtype, cpu=Cpu.from_flags("x86_64", flags), check=all_available)) == expected


def test_arm_gets_int8_weights_by_the_same_check():
    """Not measured here (no Arm host): the selection only."""
    chosen = kernels_of(plan("cpu", torch.float32, cpu=Cpu.from_flags("aarch64", GRAVITON3), check=all_available))
    assert chosen == {"linear": "int8-weights", "small": "float", "output": "int8-weights", "embedding": "int8-weights"}
    assert kernels.default_dtype("cpu", Cpu.from_flags("aarch64", GRAVITON3)) == torch.bfloat16
    assert kernels.default_dtype("cpu", Cpu.from_flags("aarch64", {"asimd"})) == torch.float32


def test_a_kernel_whose_measured_check_fails_falls_back():
    """A CPU that says VNNI but whose int8 sums are not exact (the check measures, the flags only claim)."""

    def no_exact_int8(kernel, device_type, dtype):
        return "not exact" if kernel == "w8a8" else None

    chosen = plan("cpu", torch.float32, cpu=Cpu.from_flags("x86_64", ICELAKE), check=no_exact_int8)
    assert kernels_of(chosen)["linear"] == "w7a8" and "not exact" in chosen.choices["linear"].why

    def no_onednn_bf16(kernel, device_type, dtype):
        return "no oneDNN bf16" if kernel == "bf16-blocked" else None

    chosen = plan("cpu", torch.bfloat16, cpu=Cpu.from_flags("x86_64", ZEN4), check=no_onednn_bf16)
    assert kernels_of(chosen)["small"] == "float" and kernels_of(chosen)["output"] == "float"


def test_a_requested_kernel_replaces_the_large_projections_or_is_refused_in_one_line():
    zen3 = Cpu.from_flags("x86_64", ZEN3)
    assert kernels_of(plan("cpu", torch.float32, "float", cpu=zen3, check=all_available)) == dict.fromkeys(
        kernels.ROLES, "float"
    )
    assert set(kernels_of(plan("cpu", torch.float32, "int8-weights", cpu=zen3)).values()) == {"int8-weights"}
    assert (
        kernels_of(
            plan("cpu", torch.bfloat16, "bf16-blocked", cpu=Cpu.from_flags("x86_64", ZEN4), check=all_available)
        )["linear"]
        == "bf16-blocked"
    )
    with pytest.raises(KernelError) as refused:
        plan("cpu", torch.float32, "w8a8", cpu=zen3, check=lambda k, d, t: "not exact" if k == "w8a8" else None)
    assert str(refused.value) == "--kernels w8a8 cannot run here: not exact; use --kernels auto or w7a8"
    with pytest.raises(KernelError, match="unknown kernel"):
        plan("cpu", torch.float32, "int4", cpu=zen3)
    with pytest.raises(KernelError, match="need AVX2"):
        plan("cpu", torch.float32, "w7a8", cpu=Cpu.from_flags("x86_64", {"sse4_2"}), check=all_available)


def test_a_gpu_runs_float_kernels_and_refuses_cpu_ones():
    assert set(kernels_of(plan("cuda", torch.bfloat16)).values()) == {"float"}
    with pytest.raises(KernelError, match="a CPU kernel, and this is cuda"):
        plan("cuda", torch.bfloat16, "w7a8")


def test_forcing_avx2_reaches_torchs_and_fbgembs_own_kernels():
    """In a process started with LLAMA_REF_CPU=avx2: torch dispatches its AVX2 kernels, and fbgemm's int8 sums
    saturate at 16 bits, which only its AVX2 kernel does (on a VNNI CPU, unforced, they are exact); the table
    then gives the large layers w7a8. On an AVX2 host this is what it runs anyway."""
    probe = (
        "import llama_ref, torch\n"
        "from llama_ref import kernels\n"
        "print(torch.backends.cpu.get_cpu_capability(), kernels.int8_exact(),\n"
        "      kernels.plan('cpu', torch.float32).kernel('linear'), kernels.read_cpu().forced)\n"
    )
    env = {**os.environ, "LLAMA_REF_CPU": "avx2"}
    for variable in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS"):
        env.pop(variable, None)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    if not kernels.fbgemm_available():
        pytest.skip("no fbgemm in this torch build: nothing to force")
    assert done.stdout.split() == ["AVX2", "False", "w7a8", "avx2"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return write_gguf(make_tiny_model(folder), folder / "tiny.gguf")


def test_no_float_copy_of_a_quantized_layer_survives_the_load(tiny_gguf, monkeypatch):
    monkeypatch.setattr(kernels, "SMALL_WEIGHTS", 0)  # the tiny model's projections count as large
    for kernel in ("int8-weights", "w7a8"):
        if kernels.available(kernel, "cpu", torch.float32):
            continue
        llama = Llama.build(tiny_gguf, max_seq_len=32, max_batch_size=1, device="cpu", dtype="fp32", kernels=kernel)
        model = llama.model
        assert not [name for name, m in model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Embedding)]
        quantized = [m for m in model.modules() if isinstance(m, (Int8DotLinear, Int8Linear, Int8Embedding))]
        assert len(quantized) == 4 * model.params.n_layers + 2  # wqkv, wo, w13, w2; output; embedding
        # what is left in float: norms and biases, vectors all
        floats = [
            name
            for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_floating_point() and t.dim() > 1 and "scales" not in name and "cache" not in name
        ]
        assert floats == [], floats


def run_main(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kernel", kernels.CHOICES)
def test_every_dtype_and_kernel_option_runs_or_says_in_one_line_why_not(tiny_gguf, capsys, dtype, kernel):
    code, out, err = run_main(
        capsys,
        "--model",
        str(tiny_gguf),
        "--device",
        "cpu",
        "--dtype",
        dtype,
        "--kernels",
        kernel,
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    )
    if code == 0:
        assert len(out) > len("Once upon a time") and err.strip().startswith("achieved tok/s")
    else:
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith(f"error: --kernels {kernel} cannot run here: ") and "; use --kernels auto" in err


def test_explain_kernels_prints_the_table_for_this_machine(tiny_gguf, capsys):
    code, out, _err = run_main(capsys, "--model", str(tiny_gguf), "--explain-kernels")
    chosen = plan("cpu", kernels.default_dtype("cpu"))
    assert code == 0 and f"CPU class {chosen.cpu}" in out
    for role, choice in chosen.choices.items():
        assert any(line.split()[:2] == [role, choice.kernel] for line in out.splitlines()), out


@pytest.mark.slow  # a sweep or subprocesses that load a model: make test, not test-fast
@pytest.mark.parametrize("kernel", ["auto", "w7a8"])
def test_a_lesser_class_runs_or_refuses_in_one_line(tiny_gguf, kernel):
    """python -m llama_ref --cpu generic: the class of an x86 CPU without AVX2, where fbgemm cannot run."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_ref",
            "--cpu",
            "generic",
            "--model",
            str(tiny_gguf),
            "--device",
            "cpu",
            "--kernels",
            kernel,
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    if kernel == "auto":
        assert done.returncode == 0 and done.stderr.startswith("achieved tok/s"), done.stderr
    else:
        assert done.returncode == 1 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
        assert "need AVX2" in done.stderr, done.stderr


def test_a_small_model_keeps_its_output_out_of_the_quantized_kernels():
    """SmolLM2-135M with a w7a8 output answered nothing at all; its projections are all small, so its output
    takes the small role (float) while a 1.5B model's output is quantized."""
    smollm2 = ModelArgs(
        dim=576, n_layers=2, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536, tie_embeddings=True
    )
    qwen_1_5b = ModelArgs(
        dim=1536, n_layers=2, n_heads=12, n_kv_heads=2, vocab_size=151936, hidden_dim=8960, tie_embeddings=True
    )
    assert "output" not in layer_counts(smollm2) and layer_counts(smollm2)["small"][0] == 2 * 7 + 1
    assert layer_counts(qwen_1_5b)["output"] == (1, 151936 * 1536)
