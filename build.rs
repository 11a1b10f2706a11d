//! Generates the gRPC code from `proto/sovkms/v1/` (the product, with the
//! descriptor set its reflection serves) and `proto/sovkms/bench/v1/` (the
//! benchmark's echo ceiling, kept out of that descriptor set).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("sovkms_descriptor.bin"))
        // Messages that carry plaintext or data keys get a hand-written,
        // redacted Debug (src/api/proto.rs) instead of a derived one.
        .skip_debug([
            "sovkms.v1.EncryptRequest",
            "sovkms.v1.DecryptResponse",
            "sovkms.v1.GenerateDataKeyResponse",
        ])
        .compile_protos(&["proto/sovkms/v1/sovkms.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .compile_protos(&["proto/sovkms/bench/v1/bench.proto"], &["proto"])?;
    Ok(())
}
