# syntax=docker/dockerfile:1
# Two images from one build of the workspace:
#   docker build -t ghcr.io/claude-relay/claude-relay-proxy:0.1.0 .
#   docker build --target operator -t ghcr.io/claude-relay/claude-relay-operator:0.1.0 .
# The proxy image is the default (last) target. The operator renders relays'
# Deployments with this image and only `args`, so its entrypoint must be the
# proxy; the chart passes the proxy image to the operator (PROXY_IMAGE).
# Both run on distroless (no shell, no package manager) as the nonroot user.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target dir across builds; the
# binaries are copied out of the cache in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p claude-relay-proxy --bin claude-relay-proxy \
      -p claude-relay-operator --bin claude-relay-operator \
 && mkdir -p /out \
 && cp target/release/claude-relay-proxy target/release/claude-relay-operator /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
USER 65532:65532

FROM runtime AS operator
COPY --from=build /out/claude-relay-operator /usr/local/bin/claude-relay-operator
# /metrics, /healthz, /readyz
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/claude-relay-operator"]

FROM runtime AS proxy
COPY --from=build /out/claude-relay-proxy /usr/local/bin/claude-relay-proxy
# 8080: the API; 9090: /healthz, /readyz, /metrics
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/claude-relay-proxy"]
CMD ["--config", "/etc/claude-relay/config/config.yaml"]
