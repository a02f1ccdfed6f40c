# Newcomer commands (see README): `make demo` runs the main job, `make test` runs the tests.
# Each creates its own virtualenv with the pinned CPU torch first, so nothing pulls a CUDA build.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test bench lint clean

.venv-demo/.ready: requirements.txt
	$(PYTHON) -m venv .venv-demo
	.venv-demo/bin/python -m pip install -q $(TORCH_PIN)
	.venv-demo/bin/python -m pip install -q -r requirements.txt
	touch $@

.venv-test/.ready: requirements.txt requirements-test.txt
	$(PYTHON) -m venv .venv-test
	.venv-test/bin/python -m pip install -q $(TORCH_PIN)
	.venv-test/bin/python -m pip install -q -r requirements-test.txt
	touch $@

demo: .venv-demo/.ready
	.venv-demo/bin/python -m lib_fluxq demo

test: .venv-test/.ready
	.venv-test/bin/python -m ruff check .
	.venv-test/bin/python -m pytest -q

bench: .venv-test/.ready
	.venv-test/bin/python bench/dequant.py

lint: .venv-test/.ready
	.venv-test/bin/python -m ruff check .

clean:
	rm -rf .venv-demo .venv-test .pytest_cache
