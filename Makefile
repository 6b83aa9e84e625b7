# edgeact: `make test` and `make demo` each set up .venv themselves (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# Debian packages the tests need: libusb for pyrealsense2; EGL + Mesa for MuJoCo offscreen rendering.
APT_PACKAGES := libusb-1.0-0 libegl1 libopengl0 libgl1-mesa-dri
EXTRAS := cpu,export,serial,can,realsense,sim,calibration,plot,dev

.PHONY: setup system-deps test test-robot-floor demo bench train-reference eval clean

setup: $(STAMP)

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${db:Status-Status}' $$p 2>/dev/null | grep -qx installed || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# torch first, from the pinned CPU wheel, so nothing later pulls a CUDA build. A venv without pip (its creation
# interrupted) is made again; the stamp is touched only once both installs succeeded, and is redone when the pins
# or this file (EXTRAS, the torch pin) change.
$(STAMP): pyproject.toml constraints.txt Makefile | system-deps
	$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: system-deps $(STAMP)
	$(PY) -m pytest -q

# The robot side (runtime, drivers, calibration) at the oldest numpy and onnxruntime pyproject allows: what PyPI gives
# JetPack 6's Python 3.10. Its own venv, pinned as constraints.txt but for those two. Not part of `make test`.
FLOOR := .venv-floor
FLOOR_PINS := numpy==2.2.6 onnxruntime==1.23.2
test-robot-floor: system-deps
	$(FLOOR)/bin/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(FLOOR)
	$(FLOOR)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	grep -v -e '^numpy==' -e '^onnxruntime==' constraints.txt > $(FLOOR)/constraints.txt
	for pin in $(FLOOR_PINS); do echo $$pin >> $(FLOOR)/constraints.txt; done
	$(FLOOR)/bin/python -m pip install -q --disable-pip-version-check -c $(FLOOR)/constraints.txt -e ".[$(EXTRAS)]"
	$(FLOOR)/bin/python -m pytest -q tests/runtime tests/drivers tests/calibration tests/test_packaging.py

# The main job on the built-in simulated robot: the committed reference ARM (trained by `make train-reference`)
# is exported to a verified bundle, given the depth tokenizer stage (depth forced from the camera) and
# quantized to int8; then one episode of the reference task runs on the MuJoCo mobile manipulator (servo bus
# on a pty, rendered RGB-D camera, both in the simulator's process) through the pipelined loop.
DEMO := out/demo
REFERENCE := drivers/sim/reference_arm
EDGEACT := $(VENV)/bin/edgeact
demo: system-deps $(STAMP)
	$(EDGEACT) export $(REFERENCE)/checkpoint --out $(DEMO)/export-fp32 --overwrite --frames 1 --chunk 8
	$(EDGEACT) add-depth-tokenizer $(DEMO)/export-fp32 --tokenizer $(REFERENCE)/depth_tokenizer --out $(DEMO)/bundle-fp32 --overwrite
	rm -rf $(DEMO)/bundle-int8
	$(EDGEACT) quantize $(DEMO)/bundle-fp32 --precision int8 --out $(DEMO)/bundle-int8
	MUJOCO_GL=egl $(EDGEACT) demo --robot mujoco --policy bundle --bundle $(DEMO)/bundle-int8 --out $(DEMO)

bench: system-deps $(STAMP)
	$(EDGEACT) bench-suite --out out/bench

# The reference ARM: the depth tokenizer on simulated depth images, scripted-expert demonstrations on the
# MuJoCo robot, then CPU training (45 min on a 2-core AVX2 machine, 26 min on a 2-core Zen 4 with bf16; see README). Copy out/reference/{checkpoint,depth_tokenizer}
# into $(REFERENCE) to make it the one `make demo` uses.
train-reference: system-deps $(STAMP)
	$(EDGEACT) train-depth-tokenizer --out out/reference/depth_tokenizer --overwrite
	$(EDGEACT) train-reference --generate-demos 1200 --demo-workers 2 --demos out/reference/demos --depth-tokenizer out/reference/depth_tokenizer --out out/reference/checkpoint --threads 2 --overwrite

# Closed-loop success of the reference ARM per precision, with and without forced depth (see README).
eval: system-deps $(STAMP)
	MUJOCO_GL=egl $(EDGEACT) eval --episodes 50 --bundle fp32=$(DEMO)/bundle-fp32 --bundle int8=$(DEMO)/bundle-int8 --out out/eval

clean:
	rm -rf $(VENV) $(FLOOR) build *.egg-info
