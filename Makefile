# Two entry points a new user needs (see README): `make demo` and `make test`.
# `make demo` writes a phantom study and a config into ./demo and runs the
# proxy on https://localhost:8002 with them.
PYTHON ?= python3
VENV ?= .venv
DEMO_DIR ?= demo
CERT_DIR ?= .
PORT ?= 8002
BIN := $(VENV)/bin

.PHONY: venv demo test bench soak clean

$(BIN)/twistd: setup.py $(shell find zhiva twisted -name '*.py')
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet ".[test]"
	# Twisted's plugin caches: regenerate so twistd and zhiva find every plugin.
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; import zhiva.plugins; list(getPlugins(IPlugin)); list(getPlugins(IPlugin, zhiva.plugins))"
	touch $@

venv: $(BIN)/twistd

demo: venv
	$(BIN)/python -m zhiva.demo $(DEMO_DIR) --certs $(CERT_DIR) --port $(PORT)
	exec $(BIN)/twistd --nodaemon --pidfile= zhiva --config-dir $(DEMO_DIR) \
		--listen ssl:$(PORT):privateKey=$(CERT_DIR)/zhiva.key:certKey=$(CERT_DIR)/zhiva.crt

test: venv
	$(BIN)/python -m pytest

# Not tests: measurements for the README (bench/relay.py, bench/soak.py).
bench: venv
	$(BIN)/pip install --quiet ".[bench]"
	$(BIN)/python bench/relay.py

soak: venv
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis demo
