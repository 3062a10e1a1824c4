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
    // The compiled policy serializes to JSON for the agent's /config_dump
    // (secrets are hashed before they reach this form, and redacted there).
    tonic_prost_build::configure()
        .message_attribute(".palisade.policy.v1", "#[derive(serde::Serialize)]")
        .enum_attribute(".palisade.policy.v1", "#[derive(serde::Serialize)]")
        // Audit batches are hashed into the collector's chain: a map with a
        // fixed order encodes the same way every time.
        .btree_map(".palisade.audit.v1")
        .compile_fds(fds)?;
    Ok(())
}
