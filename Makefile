# Newcomer commands (see README): `make demo` runs the main job, `make test` runs the tests.
# Each creates its own virtualenv with the pinned CPU torch first, so nothing pulls a CUDA build.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test bench lint clean chromium standalone

.venv-demo/.ready: requirements.txt
	$(PYTHON) -m venv .venv-demo
	.venv-demo/bin/python -m pip install -q $(TORCH_PIN)
	.venv-demo/bin/python -m pip install -q -r requirements.txt
	touch $@

.venv-test/.ready: requirements.txt requirements-ui.txt requirements-test.txt
	$(PYTHON) -m venv .venv-test
	.venv-test/bin/python -m pip install -q $(TORCH_PIN)
	.venv-test/bin/python -m pip install -q -r requirements-test.txt
	touch $@

# The main job: the quantization-level table on the embedded Flux slice (about a minute on two idle CPU cores).
demo: .venv-demo/.ready
	.venv-demo/bin/python -m lib_fluxq compare --plot out/compare.png

test: .venv-test/.ready chromium
	.venv-test/bin/python -m ruff check .
	.venv-test/bin/python -m pytest -q
	$(MAKE) standalone

# The README's standalone install as written, from the runtime requirement files alone (not the test pins), into a
# fresh .venv-standalone: the tab must start and answer HTTP on 127.0.0.1. pip's wheel cache keeps reruns short.
standalone:
	PYTHON=$(PYTHON) TORCH_PIN=$(TORCH_PIN) bash .ci/standalone_install.sh

bench: .venv-test/.ready
	.venv-test/bin/python bench/dequant.py
	.venv-test/bin/python bench/forward.py
	.venv-test/bin/python bench/quantize.py

# Debian's chromium for the real-browser UI test (Playwright drives /usr/bin/chromium; it downloads no browser).
# Needs root (CI runs as root); without it the browser test skips with its reason.
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium could not be installed: the browser test will skip"

lint: .venv-test/.ready
	.venv-test/bin/python -m ruff check .

clean:
	rm -rf .venv-demo .venv-test .venv-standalone .pytest_cache
