# `pleura-trainer` with libtorch 2.13 (tch 0.26), in two variants:
#
#   docker build -f docker/trainer.Dockerfile --target cuda --build-arg VARIANT=cuda -t pleura/trainer:0.1.0-cuda .
#   docker build -f docker/trainer.Dockerfile --target cpu  -t pleura/trainer:0.1.0-cpu .
#
# libtorch comes from the PyPI torch wheel (the only source that works for
# tch 0.26), installed with pip into /opt/pleura/torch-site. The binary is
# linked against it there, and build.rs bakes that path into its rpath.
# - cuda: the wheel with the full CUDA set it pins (cuBLAS, cuDNN, NCCL, ...),
#   which libtorch_cuda.so needs; the driver's libcuda.so comes from the node.
# - cpu: only the libraries the trainer loads on a CPU (libtorch_cpu, c10,
#   gomp, and the two small CUDA runtime libraries libtorch_cpu needs to load).
#
# `--target prebuilt` packs a trainer built outside with a torch-site prepared
# outside (scripts/images.sh does that, offline, for both variants); the build
# context then holds bin/pleura-trainer and torch-site/.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${PYTHON_IMAGE} AS torch-cpu
RUN pip install --no-cache-dir --no-deps --target /opt/pleura/torch-site \
        torch==2.13.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85

FROM ${PYTHON_IMAGE} AS torch-cuda
# torch's own CUDA requirements, at the versions torch 2.13.0 pins; its
# Python dependencies (sympy, triton, ...) are not needed by a Rust binary.
RUN pip install --no-cache-dir --target /opt/pleura/torch-site \
        "cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.3" \
        nvidia-cudnn-cu13==9.20.0.48 nvidia-cusparselt-cu13==0.8.1 \
        nvidia-nccl-cu13==2.29.7 nvidia-nvshmem-cu13==3.4.5 \
    && pip install --no-cache-dir --no-deps --target /opt/pleura/torch-site torch==2.13.0

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY --from=torch-cpu /opt/pleura/torch-site /opt/pleura/torch-site
COPY . .
ENV LIBTORCH=/opt/pleura/torch-site/torch
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pleura-trainer --bins \
    && mkdir -p /out \
    && objcopy --strip-debug target/release/pleura-trainer /out/pleura-trainer

FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="pleura-trainer" \
      org.opencontainers.image.description="Pleura trainer: retrains the effusion ResNet with libtorch and publishes through the promotion gate" \
      org.opencontainers.image.version="${VERSION}-${VARIANT}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Pleura"
# hadolint ignore=DL3008
RUN if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 pleura \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin pleura \
    && install -d -o 10001 -g 10001 /var/lib/pleura/registry /var/lib/pleura/keys
# The prebuilt targets' binaries were linked against a libtorch elsewhere;
# the built ones find it through their rpath, and this changes nothing.
ENV LD_LIBRARY_PATH=/opt/pleura/torch-site/torch/lib
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["/usr/local/bin/pleura-trainer"]

FROM runtime AS cpu-libs
COPY --from=torch-cpu /opt/pleura/torch-site/torch/lib/libtorch_cpu.so \
     /opt/pleura/torch-site/torch/lib/libc10.so \
     /opt/pleura/torch-site/torch/lib/libgomp.so.1 /opt/pleura/torch-site/torch/lib/
COPY --from=torch-cpu /opt/pleura/torch-site/nvidia/cu13/lib/libcudart.so.13 \
     /opt/pleura/torch-site/nvidia/cu13/lib/libcupti.so.13 /opt/pleura/torch-site/nvidia/cu13/lib/

FROM cpu-libs AS cpu
COPY --from=build /out/pleura-trainer /usr/local/bin/

FROM runtime AS cuda
COPY --from=torch-cuda /opt/pleura/torch-site /opt/pleura/torch-site
COPY --from=build /out/pleura-trainer /usr/local/bin/

FROM runtime AS prebuilt
COPY torch-site/ /opt/pleura/torch-site/
COPY --chmod=0755 bin/pleura-trainer /usr/local/bin/
