// Compiles the .proto contracts with protox (pure Rust), so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/palisade/policy/v1/policy.proto",
        "proto/palisade/identity/v1/identity.proto",
        "proto/palisade/discovery/v1/discovery.proto",
        "proto/palisade/audit/v1/audit.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
