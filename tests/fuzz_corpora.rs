//! The corpora the fuzz targets kept (fuzz/README.md: each target ran 10
//! million libFuzzer executions without a crash) replayed on every CI run
//! through the same parsers, so a regression on an input the fuzzer found
//! interesting fails here without a fuzzer. (`kmip_ttlv`'s corpus is
//! replayed through a real broker by tests/kmip.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(name);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    out.sort();
    assert!(out.len() >= 10, "the {name} corpus is missing");
    out
}

#[test]
fn spiffe_ids() {
    for (p, b) in corpus("spiffe_parse") {
        if let Ok(s) = std::str::from_utf8(&b) {
            if let Ok(c) = sovkms::region::Caller::parse_spiffe(s) {
                let again = sovkms::region::Caller::parse_spiffe(&c.spiffe_id());
                assert_eq!(again.ok(), Some(c), "{}", p.display());
            }
            let _ = sovkms::policy::Principal::parse(s);
        }
    }
}

#[test]
fn configs() {
    for (_, b) in corpus("config_parse") {
        if let Ok(s) = std::str::from_utf8(&b) {
            if let Err(e) = sovkms::config::Settings::parse(s, Path::new("/nonexistent")) {
                assert!(!e.to_string().is_empty());
            }
        }
    }
}

#[test]
fn audit_logs() {
    // The P-256 generator point: a valid key that signed nothing here.
    let mut key = vec![4u8];
    key.extend(
        hex::decode("6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296").unwrap(),
    );
    key.extend(
        hex::decode("4fe342e2fe1a7f9b8e7eeb4a7c0f9e162bce33576b315ececbb6406837bf51f5").unwrap(),
    );
    for (p, b) in corpus("audit_log") {
        for require in [false, true] {
            if let Err(f) = sovkms::audit::verify(b.as_slice(), &key, require) {
                assert!(!f.to_string().is_empty(), "{}", p.display());
            }
        }
    }
}
