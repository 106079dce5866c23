# The runnel image: the one `runnel` binary (server and CLI) on a slim
# Debian, run as the unprivileged user `runnel`, data in /var/lib/runnel.
#
#   docker build -t runnel .                        # compiles in Docker
#   docker run -p 127.0.0.1:9092:9092 runnel        # one node, config/docker/runnel.toml
#   docker compose up -d                            # three nodes, see docker-compose.yml
#
# Base images are build arguments, so a machine without a registry can
# build from local images. `--target prebuilt` skips the Rust stage and
# copies target/release/runnel from the build context instead (built on the
# host with `cargo build --release`, against the same Debian release):
#
#   docker build --target prebuilt --build-arg RUNTIME_IMAGE=my/debian:bookworm -t runnel .
#
# Stages are ordered so that `--target prebuilt` never reaches the Rust
# image, also with the classic (non-BuildKit) builder, which builds every
# stage up to the target. For the same reason the default target
# (`runtime`, compiled in Docker) needs BuildKit (DOCKER_BUILDKIT=1 with
# docker buildx): the classic builder would build `prebuilt` on the way
# and fail without a host-built binary. Without BuildKit, build on the
# host and use `--target prebuilt` (docker compose:
# RUNNEL_BUILD_TARGET=prebuilt).

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# What both final images share: user, directories, configuration, ports,
# health check, entrypoint.
FROM ${RUNTIME_IMAGE} AS runtime-base
RUN groupadd --system --gid 10001 runnel \
 && useradd --system --uid 10001 --gid runnel --no-create-home \
        --home-dir /var/lib/runnel --shell /usr/sbin/nologin runnel \
 && mkdir -p /var/lib/runnel /etc/runnel \
 && chown runnel:runnel /var/lib/runnel
# runnel.toml: the default single node; cluster.toml: docker-compose.yml's nodes.
COPY config/docker/runnel.toml config/docker/cluster.toml /etc/runnel/
USER runnel:runnel
WORKDIR /var/lib/runnel
VOLUME ["/var/lib/runnel"]
# The client gRPC port (Raft and replication use it too), and the metrics
# endpoint (metrics_listen: /metrics, /health, /ready).
EXPOSE 9092 9644
# Healthy when the node answers SERVING on the standard gRPC health service.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["runnel", "--bootstrap", "127.0.0.1:9092", "cluster", "health", "--node"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["runnel"]
CMD ["server", "--config", "/etc/runnel/runnel.toml"]

# The image from a binary built on the host: target/release/runnel, or
# another path of the build context given as RUNNEL_BINARY.
FROM runtime-base AS prebuilt
ARG RUNNEL_BINARY=target/release/runnel
COPY ${RUNNEL_BINARY} /usr/local/bin/runnel

# Compiles the binary; needs crates.io.
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY storage storage
COPY replication replication
COPY controller controller
COPY benches benches
COPY src src
# Keep symbols for backtraces, drop the debug info (profile.release has debug = 1).
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN cargo build --release --locked --bin runnel \
 && install -D -m 0755 target/release/runnel /out/runnel

# The default image: the binary compiled above.
FROM runtime-base AS runtime
COPY --from=builder /out/runnel /usr/local/bin/runnel
