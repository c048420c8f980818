# edgefleet: the two commands a newcomer needs are `make demo` and `make test`.
# Each sets itself up: a .venv in the checkout, torch's CPU wheel pinned first, Mosquitto where missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgefleet-installed
# torch is installed by this pin before the project so that nothing pulls a multi-GB CUDA build.
# Elsewhere, point pip at a CPU index with e.g. TORCH_PIP_ARGS="--index-url <your CPU wheel index>".
TORCH_PIN      ?= torch==2.13.0
TORCH_PIP_ARGS ?=
SHADOW := build/src/edgefleet

.PHONY: help venv lock services lint types contracts pytest test demo bench schemas clean check-deploy check-arm64

help:
	@echo "make demo   run the end-to-end demo (sets itself up)"
	@echo "make test   lint, types, layer contracts and the test suite (sets itself up)"
	@echo "make bench  run the benchmarks and update docs/benchmarks.md"
	@echo "make check-arm64  the agent in a Debian arm64 chroot under qemu on x86-made artifacts (root, slow)"

venv: $(STAMP)

# constraints.txt holds the versions the suite was last green with (`make lock` refreshes it, in a commit of its own).
LOCK := constraints.txt

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

# A fresh venv from pyproject.toml's ranges alone, frozen into constraints.txt; run `make test` before committing it.
lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install --quiet --upgrade pip
	build/lock-venv/bin/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_PIN)"
	build/lock-venv/bin/python -m pip install --quiet ".[dev]"
	{ grep '^#' $(LOCK); \
	  build/lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^edgefleet' \
	    | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf build/lock-venv

# Mosquitto: the tests use one answering on 127.0.0.1:1883, else start their own from the binary.
# Install Debian's package where the binary is missing and we may (root with apt-get).
services:
	@if ! command -v mosquitto >/dev/null 2>&1 && ! test -x /usr/sbin/mosquitto; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's mosquitto package"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients) \
	      || echo "could not install mosquitto: MQTT tests will skip unless a broker answers on 127.0.0.1:1883"; \
	  else \
	    echo "mosquitto missing and not root: MQTT tests will skip unless a broker answers on 127.0.0.1:1883"; \
	  fi; \
	fi
	@# tests/deploy: promtool and prometheus (Debian's prometheus), systemd-analyze (systemd). The package's own
	@# prometheus service is stopped again where it was started (the tests run their own on a free port).
	@missing=""; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's$$missing for the deploy checks"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) \
	      || echo "could not install$$missing: the deploy checks that need them will skip"; \
	    case "$$missing" in *prometheus*) \
	      if [ -d /run/systemd/system ]; then systemctl disable --now prometheus >/dev/null 2>&1 || true; \
	      elif [ -x /etc/init.d/prometheus ]; then /etc/init.d/prometheus stop >/dev/null 2>&1 || true; fi;; \
	    esac; \
	  else \
	    echo "missing$$missing and not root: the deploy checks that need them will skip"; \
	  fi; \
	fi

# mypy cannot follow setuptools' editable finder; it reads this symlink tree.
$(SHADOW):
	mkdir -p $(SHADOW)
	for p in protocols agent compression controller; do ln -sfn ../../../$$p $(SHADOW)/$$p; done

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP) $(SHADOW)
	$(BIN)/mypy -p edgefleet

contracts: $(STAMP)
	$(BIN)/lint-imports

pytest: $(STAMP) services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint types contracts pytest

# The deploy/ checks alone (promtool, a live Prometheus, compose config, systemd-analyze, Mosquitto); `make test`
# runs them too, as part of the whole suite.
check-deploy: $(STAMP) services
	$(BIN)/python -m pytest tests/deploy $(PYTEST_ARGS)

# The agent in a Debian arm64 userland under qemu-user (build/arm64, reused) validating artifacts made and signed
# here; writes its table into docs/benchmarks.md. Root; minutes (the first run builds the chroot). Not in `make test`.
check-arm64: $(STAMP)
	EDGEFLEET_PYTHON=$(CURDIR)/$(BIN)/python bash deploy/arm64/check.sh

schemas: $(STAMP)
	$(BIN)/python -m edgefleet.protocols.schemas docs/schemas

demo: $(STAMP) services
	$(BIN)/edgefleet demo $(DEMO_ARGS)

bench: $(STAMP) services
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache .hypothesis
