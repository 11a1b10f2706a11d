//! The README's "From zero to one broker" block, run exactly as written
//! (with a free port and the binary under test first on PATH).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn the_readme_path_from_zero_to_a_broker_works_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```sh first-broker\n")
        .expect("README has a first-broker block");
    let body = &readme[start + "```sh first-broker\n".len()..];
    let script = &body[..body.find("\n```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("first-broker.sh"), script).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_sovkms"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = std::process::Command::new("bash")
        .arg("first-broker.sh")
        .current_dir(dir.path())
        .env("PATH", path)
        .env("PORT", port.to_string())
        .env_remove("SOVKMS_ADDR")
        .env_remove("SOVKMS_SERVER_NAME")
        .env("SOVKMS_LOG", "warn")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    let log = std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default();
    assert!(
        o.status.success(),
        "stdout:\n{out}\nstderr:\n{err}\nbroker log:\n{log}"
    );
    assert!(out.contains("decrypted in region: ok"), "{out}");
    assert!(out.contains("state      active"), "{out}");
}
