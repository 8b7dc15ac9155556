//! Compiles `proto/` with protox (pure Rust: no `protoc` needed) and generates the tonic code into
//! `OUT_DIR`, plus the encoded file descriptor set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["loraserve/v1/loraserve.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("loraserve_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        // Malformed messages (e.g. invalid UTF-8 in a string field) are the client's fault: INVALID_ARGUMENT.
        .codec_path("crate::server::codec::ValidatingCodec")
        .compile_fds(fds)?;
    Ok(())
}
