//! Compiles keygate's own gRPC API from `proto/`, with a vendored `protoc` so a fresh
//! machine needs no system package for it; and generates the server side of Envoy's
//! `envoy.service.auth.v3.Authorization` over keygate's lean view of `CheckRequest`
//! (`src/api/envoy_wire.rs`, which says why).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("keygate_descriptor.bin"))
        .compile_protos(
            &[
                "proto/keygate/v1/authorizer.proto",
                "proto/keygate/v1/keys.proto",
                "proto/keygate/v1/partners.proto",
                "proto/keygate/v1/revocations.proto",
            ],
            &["proto"],
        )?;
    let check = tonic_build::manual::Method::builder()
        .name("check")
        .route_name("Check")
        .input_type("crate::api::envoy_wire::CheckRequestView")
        .output_type("crate::api::envoy_answer::CheckAnswer")
        .codec_path("tonic_prost::ProstCodec")
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[tonic_build::manual::Service::builder()
            .name("Authorization")
            .package("envoy.service.auth.v3")
            .method(check)
            .build()]);
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    Ok(())
}
