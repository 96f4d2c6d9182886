# Two set-up commands do everything on a fresh machine with Python 3.11:
#   make demo   -- create .venv, install, run the end-to-end demo on a local Ray Serve tier
#   make test   -- create .venv, install, run the test suite
# and, for quick work: make test-fast (unit tests only, no Ray, under a minute).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# tritonclient (tests/test_cloud_triton.py: a third-party OIP client calls the cloud
# tier) needs protobuf<7 (tritonclient[grpc] 2.73 pins protobuf>=6.30,<7) and
# splitgate needs protobuf>=7.35, so it gets its own virtualenv inside .venv, made
# here and never at test time. Every package is pinned exactly and installed with
# --no-deps; `pip check` and importing tritonclient.grpc fail the build if a pin is
# missing. Adds about 10 s and 150 MB to a fresh install.
TRITON_VENV  := $(VENV)/triton
TRITON_PINS  := tritonclient==2.73.0 grpcio==1.85.3 protobuf==6.33.6 numpy==2.4.6 \
                ml-dtypes==0.5.4 packaging==26.4 python-rapidjson==1.25 urllib3==2.8.0 \
                typing_extensions==4.16.0
# The stamp's name carries a digest of the pins: changing a pin rebuilds the env.
TRITON_STAMP := $(TRITON_VENV)/.installed-$(shell echo '$(TRITON_PINS)' | sha256sum | cut -c1-12)

# What a device has: a virtualenv holding only `pip install .` (no extras: no torch, no
# Ray), for tests/test_device_profile.py (`splitgate profile` runs there). Made here,
# never at test time; rebuilt when the package's sources change.
DEVICE_VENV    := $(VENV)/device
DEVICE_SOURCES := pyproject.toml $(shell find splitgate planner edge cloud netsim experiments loadtests \
                    -name '*.py' -o -name '*.yaml' -o -name '*.log' 2>/dev/null)
DEVICE_STAMP   := $(DEVICE_VENV)/.installed

.PHONY: demo test test-fast install triton-env device-env proto clean

demo: $(STAMP)
	$(BIN)/splitgate demo

# The lint rule first (only `splitgate` is a top-level import name), then the suite.
# pytest exits 5 when it collects no test; treat that as a failure to find tests, loudly.
test: $(STAMP) $(TRITON_STAMP) $(DEVICE_STAMP)
	$(BIN)/ruff check --select TID251 .
	$(BIN)/python -m pytest -q ; rc=$$? ; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi ; exit $$rc

# The unit tests alone: no Ray Serve tier, no server subprocesses, no whole-model
# sweeps (`slow`); under a minute.
# Tests that need them carry the `integration` marker (pyproject.toml).
test-fast: $(STAMP)
	$(BIN)/ruff check --select TID251 .
	$(BIN)/python -m pytest -q -m "not integration and not slow" ; rc=$$? ; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi ; exit $$rc

install: $(STAMP)

# torch first, pinned to the CPU build, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

device-env: $(DEVICE_STAMP)

$(DEVICE_STAMP): $(DEVICE_SOURCES)
	$(PYTHON) -m venv --clear $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEVICE_VENV)/bin/python -m pip install -q .
	touch $(DEVICE_STAMP)

triton-env: $(TRITON_STAMP)

$(TRITON_STAMP):
	$(PYTHON) -m venv --clear $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --no-deps $(TRITON_PINS)
	$(TRITON_VENV)/bin/python -m pip check
	$(TRITON_VENV)/bin/python -c "import tritonclient.grpc, numpy"
	touch $(TRITON_STAMP)

# Regenerate the wire stubs from proto/inference.proto (tests fail if they drift).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Isplitgate/protocol=proto \
		--python_out=. --grpc_python_out=. --pyi_out=. proto/inference.proto

clean:
	rm -rf $(VENV) build *.egg-info
