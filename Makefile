# SIREN — `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := .stamps
LOCK := requirements.lock
LOCKENV := $(STAMP)/lockenv
PIP_TOOLS := pip-tools==7.7.0
VOICES := flite festival festlex-cmu festlex-poslex festvox-kdlpc16k sox
STEP ?=
RUN ?= runs/demo/adapt
SWEEP ?= launch/sweeps/adapt_lr.yaml
COUNT ?= 3
# pytest-xdist workers for `make test` (a module to a worker; tests/conftest.py gives each its share of the cores)
TEST_WORKERS ?= 2
export WANDB_SILENT ?= true

.PHONY: install venv lock voices test test-all lint format demo verify bench sweep clean

install: $(STAMP)/install $(STAMP)/voices

# The venv is usable when its python runs pip; a half-made one (an interrupted first install, or
# `python -m venv --without-pip`) is rebuilt rather than failing every later install with "No module named pip".
venv:
	@if [ -x $(BIN)/python ] && $(BIN)/python -m pip --version >/dev/null 2>&1; then :; \
	else \
	  if [ -e $(VENV) ]; then echo "$(VENV) cannot install (no working pip): rebuilding it"; rm -rf $(VENV); fi; \
	  $(PY) -m venv $(VENV) || exit 1; \
	fi

# Everything comes from the lock (exact versions, hashes checked), then siren itself with no resolution at all;
# the install check fails the install when a locked version differs or a compiled library does not load.
$(STAMP)/install: setup.cfg pyproject.toml $(LOCK) siren/install_check.py
	@mkdir -p $(STAMP)
	@$(MAKE) --no-print-directory venv
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m siren.install_check --lock $(LOCK)
	@touch $@

# Regenerate the lock from setup.cfg (+ the build back end) with pip-tools, against PyPI alone (no local
# indexes or find-links of this machine). Run after changing a requirement; commit the new lock.
lock:
	@test -x $(LOCKENV)/bin/pip-compile || { $(PY) -m venv $(LOCKENV) && $(LOCKENV)/bin/python -m pip install -q $(PIP_TOOLS); }
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
	  $(LOCKENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-find-links \
	  --no-emit-index-url --extra dev --extra sweeps --extra eval --output-file $(LOCK) setup.cfg requirements-build.in

# Debian TTS voices for the embedded corpus, codec2 (c2enc/c2dec, the reference codec siren eval compares against) and
# the human recordings `siren demo` ends its eval on (codec2-examples; alsa-utils' samples): apt-get when usable, else
# the command. The check reruns when this Makefile changes (a package added here reaches machines set up before).
voices: $(STAMP)/voices

$(STAMP)/voices: Makefile
	@mkdir -p $(STAMP)
	@missing=""; for p in flite text2wave sox c2enc; do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	[ -d /usr/share/festival/voices/english/ked_diphone ] || missing="$$missing ked_diphone"; \
	[ -d /usr/share/codec2/wav ] || missing="$$missing codec2-examples"; \
	[ -d /usr/share/sounds/alsa ] || missing="$$missing alsa-utils"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian voices ($$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(VOICES) codec2 codec2-examples alsa-utils >/dev/null || exit 1; \
	  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(VOICES) codec2 codec2-examples alsa-utils >/dev/null || exit 1; \
	  else \
	    echo "missing:$$missing — install with: sudo apt-get install -y $(VOICES) codec2 codec2-examples alsa-utils"; exit 1; \
	  fi; \
	fi
	@touch $@

# Chromium for the test that opens verify's report.html in a real headless browser (tests only: `demo` stays lean).
$(STAMP)/browser:
	@mkdir -p $(STAMP)
	@if ! command -v chromium >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian chromium (headless browser for the report test)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || exit 1; \
	  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || exit 1; \
	  else \
	    echo "missing: chromium — install with: sudo apt-get install -y chromium"; exit 1; \
	  fi; \
	fi
	@touch $@

# Byte-compiled first (only what changed since the last time): where PYTHONDONTWRITEBYTECODE is set, as in many CI
# containers, each of the suite's ~100 `siren` processes would otherwise compile siren's sources again.
test: install $(STAMP)/browser
	$(BIN)/python -m compileall -q siren tests >/dev/null
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not gpu" --durations=15 tests

test-all: install $(STAMP)/browser
	$(BIN)/python -m compileall -q siren tests >/dev/null
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint: $(STAMP)/install
	$(BIN)/ruff check siren tests benchmarks
	$(BIN)/ruff format --check siren tests benchmarks

format: $(STAMP)/install
	$(BIN)/ruff format siren tests benchmarks
	$(BIN)/ruff check --fix siren tests benchmarks

demo: install
	$(BIN)/siren demo

verify: install
	@if [ -z "$(STEP)" ]; then echo "usage: make verify STEP=N [RUN=$(RUN)]"; exit 2; fi
	@# make reports any failure as its own status 2: print siren's code (0 pass, 1 fail, 2 error) first.
	@$(BIN)/siren verify --run $(RUN) --step $(STEP) $(VERIFY_ARGS); rc=$$?; \
	echo "siren verify exit code: $$rc ($$( [ $$rc = 0 ] && echo pass || ([ $$rc = 1 ] && echo fail || echo error)))"; exit $$rc

sweep: install
	$(BIN)/siren sweep $(SWEEP) --count $(COUNT)

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(STAMP) runs
