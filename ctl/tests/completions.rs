//! `palisadectl completions SHELL` prints a script that knows the commands.

use std::process::Command;

#[test]
fn bash_completions_name_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_palisadectl"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("complete -F"), "{script}");
    for command in ["policy", "certs", "audit", "up", "demo", "completions"] {
        assert!(script.contains(command), "no {command} in the script");
    }
}

#[test]
fn up_without_a_mesh_file_says_what_a_mesh_directory_is() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_palisadectl"))
        .arg("up")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mesh.yaml"), "{err}");
    assert!(err.contains("examples/quickstart"), "{err}");
}
