//! Compiles keygate's own gRPC API from `proto/`, with a vendored `protoc` so a fresh
//! machine needs no system package for it.

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
                "proto/keygate/v1/revocations.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
