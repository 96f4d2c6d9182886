# Two set-up commands do everything on a fresh machine with Python 3.11:
#   make demo   -- create .venv, install, run the end-to-end demo on a local Ray Serve tier
#   make test   -- create .venv, install, run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install proto clean

demo: $(STAMP)
	$(BIN)/splitgate demo

# The lint rule first (only `splitgate` is a top-level import name), then the suite.
# pytest exits 5 when it collects no test; treat that as a failure to find tests, loudly.
test: $(STAMP)
	$(BIN)/ruff check --select TID251 .
	$(BIN)/python -m pytest -q ; rc=$$? ; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi ; exit $$rc

install: $(STAMP)

# torch first, pinned to the CPU build, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Regenerate the wire stubs from proto/inference.proto (tests fail if they drift).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Isplitgate/protocol=proto \
		--python_out=. --grpc_python_out=. --pyi_out=. proto/inference.proto

clean:
	rm -rf $(VENV) build *.egg-info
