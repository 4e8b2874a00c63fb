# The Pleura worker (`pleura-worker`) and the `pleura` CLI. No libtorch.
#
# Compile in the builder (BuildKit; cargo's registry and target dir are
# cached between builds):
#   docker build -f docker/worker.Dockerfile -t pleura/worker:0.1.0 .
# Or pack binaries built outside, e.g. by `cargo build --release`, with the
# libonnxruntime.so of `make onnxruntime` copied into the context (tests do,
# and it saves a second compile):
#   make onnxruntime && mkdir -p target/onnxruntime \
#     && cp ~/.cache/pleura/onnxruntime-1.32.0/libonnxruntime.so target/onnxruntime/
#   docker build -f docker/worker.Dockerfile --target prebuilt \
#     --build-arg BIN_DIR=target/release -t pleura/worker:0.1.0 .
#
# RUST_IMAGE and RUNTIME_IMAGE choose the bases (a mirror, a pinned digest).
# The runtime needs glibc 2.36 (bookworm) or newer.
#
# Run it read-only with every capability dropped; it needs no shell, no
# writable root and no privileges:
#   docker run --read-only --cap-drop ALL --tmpfs /tmp pleura/worker:0.1.0

ARG RUST_IMAGE=rust:1.95-bookworm
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
ARG ORT_VERSION=1.32.0

# ONNX Runtime for `engine = "onnxruntime"`: the shared library of the PyPI
# wheel, nothing else of it.
FROM ${PYTHON_IMAGE} AS onnxruntime
ARG ORT_VERSION
WORKDIR /tmp/ort
RUN pip download --no-cache-dir --no-deps "onnxruntime==${ORT_VERSION}" -d . \
    && python -m zipfile -e onnxruntime-*.whl . \
    && install -D -m 0644 "onnxruntime/capi/libonnxruntime.so.${ORT_VERSION}" /out/libonnxruntime.so

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pleura -p pleura-worker --bins \
    && mkdir -p /out \
    && for b in pleura pleura-worker; do objcopy --strip-debug target/release/$b /out/$b; done

FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="pleura-worker" \
      org.opencontainers.image.description="Pleura fleet worker: chest X-ray effusion triage, RabbitMQ in, Redis out" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Pleura"
# CA certificates, for TLS to S3 (and to brokers behind TLS). Images built
# with them already (e.g. debootstrap --include=ca-certificates) skip apt.
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
ENV PLEURA_HTTP_ADDR=0.0.0.0:9100 \
    PLEURA_LOG_FORMAT=json \
    PLEURA_ONNXRUNTIME_LIBRARY=/opt/pleura/onnxruntime/libonnxruntime.so
USER 10001:10001
EXPOSE 9100
# Exec form: SIGTERM reaches the worker itself, which drains and exits 0.
ENTRYPOINT ["/usr/local/bin/pleura-worker"]

FROM runtime AS prebuilt
ARG BIN_DIR=target/release
ARG ORT_LIB=target/onnxruntime/libonnxruntime.so
COPY ${ORT_LIB} /opt/pleura/onnxruntime/libonnxruntime.so
COPY --chmod=0755 ${BIN_DIR}/pleura ${BIN_DIR}/pleura-worker /usr/local/bin/

FROM runtime AS worker
COPY --from=onnxruntime /out/libonnxruntime.so /opt/pleura/onnxruntime/libonnxruntime.so
COPY --from=build /out/ /usr/local/bin/
