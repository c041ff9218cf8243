# keygate's container image: built from this repository, the binary only.
#
#   docker build -t keygate:0.1.0 .
#
# The build stage runs the same `cargo build --release --locked` as a developer does, and
# the runtime stage copies that binary, target/release/keygate, into a distroless image
# (glibc and CA certificates, no shell, no package manager) as a non-root user.
# helm/keygate's default image is this one.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin keygate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/keygate /usr/local/bin/keygate
# distroless's `nonroot`: the user the chart's securityContext names.
USER 65532:65532
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/keygate"]
CMD ["serve", "--config", "/etc/keygate/keygate.yaml"]
