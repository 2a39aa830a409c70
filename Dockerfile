# syntax=docker/dockerfile:1
# Multi-stage: build with the Rust toolchain, run on distroless (no shell),
# as the nonroot user (uid 65532).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p claude-relay-proxy --bin claude-relay-proxy \
 && mkdir -p /out \
 && cp target/release/claude-relay-proxy /out/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/claude-relay-proxy"]
CMD ["--config", "/etc/claude-relay/config/config.yaml"]
