# edgeact: `make test` and `make demo` each set up .venv themselves (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# Debian packages the tests need: libusb for pyrealsense2; EGL + Mesa for MuJoCo offscreen rendering.
APT_PACKAGES := libusb-1.0-0 libegl1 libopengl0 libgl1-mesa-dri
EXTRAS := export,serial,can,realsense,sim,plot,dev

.PHONY: setup system-deps test demo bench train-reference clean

setup: $(STAMP)

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# torch first, from the pinned CPU wheel, so nothing later pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: system-deps $(STAMP)
	$(PY) -m pytest -q

# The main job on the built-in simulated robot: a synthetic MolmoAct-layout checkpoint is exported to
# a verified bundle, and the bundle policy drives the simulated arm (Feetech bus on a pty, camera)
# through the pipelined loop. The checkpoint has seeded random weights until the reference ARM is trained.
DEMO := out/demo
demo: system-deps $(STAMP)
	test -f $(DEMO)/checkpoint/config.json || $(VENV)/bin/edgeact make-checkpoint --variant D --size small --seed 0 --out $(DEMO)/checkpoint
	$(VENV)/bin/edgeact export $(DEMO)/checkpoint --out $(DEMO)/bundle-fp32 --overwrite --frames 1 --chunk 8
	$(VENV)/bin/edgeact demo --policy bundle --bundle $(DEMO)/bundle-fp32 --seconds 15 --out $(DEMO)

bench: system-deps $(STAMP)
	$(VENV)/bin/edgeact bench-suite --out out/bench

# The reference ARM: scripted-expert demonstrations on the MuJoCo robot, then CPU training (~25 min on 2 cores).
train-reference: system-deps $(STAMP)
	$(VENV)/bin/edgeact train-reference --generate-demos 400 --demos out/reference/demos --out out/reference/checkpoint --overwrite

clean:
	rm -rf $(VENV) build *.egg-info
