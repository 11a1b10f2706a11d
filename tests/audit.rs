//! The audit log as an auditor sees it: an honest chain verifies offline
//! with the public key only, every kind of tampering is found at the right
//! sequence number, decrypts are never answered without a durable record
//! (kill -9, full disk), provenance verifies, aggregates leak nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use sovkms::api::proto as pb;
use sovkms::audit::{self, Kind};
use std::io::BufReader;
use std::path::Path;
use tonic::Code;

fn verify_file(
    path: &Path,
    pk: &[u8],
    require_checkpoint: bool,
) -> Result<audit::VerifyReport, audit::VerifyFailure> {
    audit::verify(
        BufReader::new(audit::segments::open(path).unwrap()),
        pk,
        require_checkpoint,
    )
}

fn verify_text(
    text: &str,
    pk: &[u8],
    require_checkpoint: bool,
) -> Result<audit::VerifyReport, audit::VerifyFailure> {
    audit::verify(BufReader::new(text.as_bytes()), pk, require_checkpoint)
}

/// A broker that did some work, stopped cleanly; its log and public key.
async fn honest_log(env: &Env) -> (std::path::PathBuf, Vec<u8>, String) {
    let cfg = env.config_with_tail("eu-central", "\n[audit]\ncheckpoint_every_records = 5\n");
    let eu = start_broker_from(env, "eu-central", &cfg).await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(env, &eu, "audited", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = client(env, "eu-central/service-app", &eu).await;
    let c = ctx(&[("case", "audit")]);
    for i in 0..8 {
        let ct = encrypt(&mut svc, &k, format!("m{i}").as_bytes(), &c)
            .await
            .unwrap()
            .ciphertext;
        decrypt(&mut svc, &ct, &c).await.unwrap();
    }
    let mut us = client(env, "us-east/service-app", &eu).await;
    assert_eq!(
        code(&decrypt(&mut us, b"junk", &c).await),
        Code::PermissionDenied
    );
    let pk = signing_key(&mut svc).await;
    let path = eu.audit_path.clone();
    eu.stop().await;
    (path, pk, k)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_chain_verifies_and_tampering_is_found_where_it_happened() {
    let env = Env::new();
    let (path, pk, key) = honest_log(&env).await;
    let rep = verify_file(&path, &pk, true).expect("honest log must verify");
    assert!(rep.records >= 20 && rep.checkpoints >= 3, "{rep:?}");
    let recs = read_records(&path);
    assert_eq!(recs[0].kind, Kind::Start);
    assert_eq!(
        recs.last().unwrap().kind,
        Kind::Checkpoint,
        "clean stop writes a final checkpoint"
    );
    // What a record holds, and what it never holds.
    let dec = recs
        .iter()
        .find(|r| r.operation == "decrypt" && r.outcome == "allowed")
        .unwrap();
    assert_eq!(dec.key_id, key);
    assert_eq!(dec.caller, spiffe("eu-central", "service", "app"));
    assert_eq!(dec.context_sha256.len(), 64);
    let refused = recs.iter().find(|r| r.outcome == "refused").unwrap();
    assert_eq!(refused.code, "PERMISSION_DENIED");
    assert!(
        refused
            .reason
            .contains("caller region us-east may not decrypt"),
        "{}",
        refused.reason
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains("m3") && !text.contains("audit\""),
        "plaintext or context leaked into the log"
    );

    let lines: Vec<&str> = text.lines().collect();
    let join = |ls: &[&str]| ls.join("\n") + "\n";
    let k = 10; // tamper around the 11th record (seq 11)

    // Edited field.
    let mut edited = lines.clone();
    let e = edited[k]
        .replace("\"outcome\":\"allowed\"", "\"outcome\":\"refused\"")
        .replace(
            "\"outcome\":\"refused\",\"code\":\"PERMISSION",
            "\"outcome\":\"allowed\",\"code\":\"PERMISSION",
        );
    assert_ne!(e, edited[k], "line {k} must have an outcome to edit");
    edited[k] = &e;
    let f = verify_text(&join(&edited), &pk, false).unwrap_err();
    assert_eq!(f.seq, 11, "{f}");
    assert!(f.why.contains("altered"), "{f}");

    // Deleted record.
    let mut deleted = lines.clone();
    deleted.remove(k);
    let f = verify_text(&join(&deleted), &pk, false).unwrap_err();
    assert_eq!(f.seq, 11, "{f}");
    assert!(f.why.contains("deleted"), "{f}");

    // Inserted record (a copy of an earlier one).
    let mut inserted = lines.clone();
    inserted.insert(k, lines[3]);
    let f = verify_text(&join(&inserted), &pk, false).unwrap_err();
    assert_eq!(f.seq, 11, "{f}");

    // Reordered records.
    let mut reordered = lines.clone();
    reordered.swap(k, k + 1);
    let f = verify_text(&join(&reordered), &pk, false).unwrap_err();
    assert_eq!(f.seq, 11, "{f}");

    // Re-hashed forgery: content and hash changed consistently; the next link breaks.
    let mut forged_rec: audit::Record = serde_json::from_str(lines[k]).unwrap();
    forged_rec.reason = "nothing to see".into();
    forged_rec.hash = forged_rec.compute_hash();
    let forged_line = serde_json::to_string(&forged_rec).unwrap();
    let mut forged = lines.clone();
    forged[k] = &forged_line;
    let f = verify_text(&join(&forged), &pk, false).unwrap_err();
    assert_eq!(f.seq, 12, "{f}");

    // Truncated tail after the last checkpoint: found only when a checkpoint is required.
    let cut = &lines[..lines.len() - 1];
    assert!(verify_text(&join(cut), &pk, false).is_ok());
    let f = verify_text(&join(cut), &pk, true).unwrap_err();
    assert!(
        f.why.contains("does not end with a signed checkpoint"),
        "{f}"
    );

    // Another key does not verify the checkpoints.
    let other = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let other = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        other.as_ref(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    use ring::signature::KeyPair;
    let f = verify_file(&path, other.public_key().as_ref(), false).unwrap_err();
    assert!(f.why.contains("signature does not verify"), "{f}");

    // The CLI says the same, with the PEM from GetInfo.
    let pem = sovkms::root::p256_spki_pem(&pk);
    let pem_file = env.dir.path().join("pub.pem");
    std::fs::write(&pem_file, pem).unwrap();
    let o = run_sovkms(
        &[
            "audit",
            "verify",
            "--log",
            path.to_str().unwrap(),
            "--pubkey",
            pem_file.to_str().unwrap(),
            "--require-checkpoint",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bad = env.dir.path().join("bad.log");
    std::fs::write(&bad, join(&deleted)).unwrap();
    let o = run_sovkms(
        &[
            "audit",
            "verify",
            "--log",
            bad.to_str().unwrap(),
            "--pubkey",
            pem_file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("sequence 11"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Syslog export.
    let out = env.dir.path().join("audit.syslog");
    let o = run_sovkms(
        &[
            "audit",
            "export",
            "--log",
            path.to_str().unwrap(),
            "--format",
            "syslog",
            "--from-seq",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sys = std::fs::read_to_string(&out).unwrap();
    let first = sys.lines().next().unwrap();
    assert!(
        first.starts_with("<109>1 20") || first.starts_with("<108>1 20"),
        "{first}"
    );
    assert!(first.contains("[sovkms@32473 seq=\"2\""), "{first}");
    assert_eq!(sys.lines().count(), lines.len() - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provenance_is_signed_and_linked_to_the_audit_chain() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let mut op = client(&env, "eu-central/operator-admin", &eu).await;
    let k = create_key(&env, &eu, "prov", vec![]).await;
    op.keys
        .re_key(pb::KeyRef { key_id: k.clone() })
        .await
        .unwrap();
    let m = op
        .keys
        .get_attributes(pb::KeyRef { key_id: k.clone() })
        .await
        .unwrap()
        .into_inner();
    let pk = signing_key(&mut op).await;
    let recs_path = eu.audit_path.clone();
    for v in &m.versions {
        let p: sovkms::keys::provenance::Provenance =
            serde_json::from_str(&v.provenance_json).unwrap();
        p.verify(&pk).unwrap();
        assert_eq!(
            (p.key_id.as_str(), p.version, p.region.as_str()),
            (k.as_str(), v.version, "eu-central")
        );
        assert_eq!(p.creator, spiffe("eu-central", "operator", "admin"));
        assert_eq!(p.root_kind, "pkcs11");
        assert!(
            p.mechanism.contains("CKM_AES_KEY_WRAP_PAD"),
            "{}",
            p.mechanism
        );
        let rec = read_records(&recs_path)
            .into_iter()
            .find(|r| r.seq == p.audit_seq)
            .unwrap();
        assert_eq!(rec.key_id, k);
        assert_eq!(
            rec.operation,
            if v.version == 1 {
                "create-key"
            } else {
                "rekey"
            }
        );
        let mut altered = p.clone();
        altered.creator = spiffe("eu-central", "operator", "mallory");
        assert!(altered.verify(&pk).is_err());
    }
    // The README's auditor steps: fetch the public key, then verify the
    // provenance and list the lifecycle events.
    let dir = env.pki.join("eu-central");
    let as_auditor = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sovkms"))
            .args(args)
            .env("SOVKMS_ADDR", &eu.addr)
            .env("SOVKMS_CA", dir.join("ca.pem"))
            .env("SOVKMS_CERT", dir.join("auditor-audit.pem"))
            .env("SOVKMS_KEY", dir.join("auditor-audit.key"))
            .output()
            .unwrap()
    };
    let o = as_auditor(&["audit", "fetch-pubkey"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        sovkms::audit::parse_public_key(&String::from_utf8_lossy(&o.stdout)).unwrap(),
        pk
    );
    let pem_file = env.dir.path().join("pub.pem");
    std::fs::write(&pem_file, &o.stdout).unwrap();
    let o = as_auditor(&[
        "key",
        "provenance",
        &k,
        "--verify",
        "--pubkey",
        pem_file.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(out.matches("signature   verified").count(), 2, "{out}");
    assert!(out.contains("create-key") && out.contains("rekey"), "{out}");
    eu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_records_for_regional_auditors_aggregates_without_identities() {
    let env = Env::new();
    let tail = format!(
        "\n[audit]\naggregate_min_group = 10\naggregate_readers = [\"{}\"]\n",
        spiffe("central", "service", "app")
    );
    let cfg = env.config_with_tail("eu-central", &tail);
    let eu = start_broker_from(&env, "eu-central", &cfg).await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(&env, &eu, "agg", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let c = ctx(&[("secret-context-value", "s3cr3t")]);
    let ct = encrypt(&mut svc, &k, b"x", &c).await.unwrap().ciphertext;
    for _ in 0..12 {
        decrypt(&mut svc, &ct, &c).await.unwrap();
    }
    for _ in 0..3 {
        assert!(decrypt(&mut svc, &ct, &ctx(&[])).await.is_err());
    }

    let mut central = client(&env, "central/service-app", &eu).await;
    // Today is still being written: aggregates cover past days only.
    let today = central
        .audit
        .get_aggregates(pb::AggregatesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(today.cells.is_empty(), "{today:?}");
    eu.clock.advance(86_400);
    let agg = central
        .audit
        .get_aggregates(pb::AggregatesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agg.min_group_size, 10);
    let dec = agg
        .cells
        .iter()
        .find(|c| c.operation == "decrypt" && c.outcome == "allowed")
        .unwrap();
    assert_eq!((dec.count, dec.key_id.as_str()), (12, k.as_str()));
    assert!(
        agg.cells.iter().all(|c| c.count >= 10),
        "small cells must be suppressed"
    );
    assert!(
        !agg.cells
            .iter()
            .any(|c| c.outcome == "refused" && c.operation == "decrypt"),
        "3 refusals < 10: suppressed"
    );
    let dump = format!("{agg:?}");
    for leak in ["spiffe://", "s3cr3t", "secret-context-value", "service/app"] {
        assert!(!dump.contains(leak), "aggregates leaked {leak}");
    }
    let digest = sovkms::envelope::EncryptionContext::new(c.clone().into_iter())
        .unwrap()
        .digest_hex();
    assert!(
        !dump.contains(&digest),
        "aggregates leaked a context digest"
    );

    // Raw records: the region's auditors only.
    for who in [
        "central/service-app",
        "eu-central/operator-admin",
        "eu-central/service-app",
        "us-east/service-app",
    ] {
        let mut cl = client(&env, who, &eu).await;
        let r = match cl
            .audit
            .export_records(pb::ExportRecordsRequest::default())
            .await
        {
            Err(s) => Err(s),
            Ok(s) => s.into_inner().message().await.map(|_| ()),
        };
        assert_eq!(code(&r), Code::PermissionDenied, "{who}");
    }
    let mut us = client(&env, "us-east/service-app", &eu).await;
    assert_eq!(
        code(
            &us.audit
                .get_aggregates(pb::AggregatesRequest::default())
                .await
        ),
        Code::PermissionDenied
    );
    // Refusals are buffered records (SECURITY.md G3): visible within
    // milliseconds, so poll briefly rather than assume they are there.
    let mut aud = client(&env, "eu-central/auditor-audit", &eu).await;
    let mut n = 0;
    for _ in 0..50 {
        let mut s = aud
            .audit
            .export_records(pb::ExportRecordsRequest {
                key_id: k.clone(),
                format: "jsonl".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        n = 0;
        while let Some(l) = s.message().await.unwrap() {
            let r: audit::Record = serde_json::from_str(&l.line).unwrap();
            assert_eq!(r.key_id, k);
            n += 1;
        }
        if n >= 17 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // create + encrypt + 12 decrypts + 3 refusals
    assert!(n >= 17, "{n}");
    eu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_decrypt_survives_kill_9() {
    let env = Env::new();
    let cfg = env.config("eu-central", "");
    let app = spiffe("eu-central", "service", "app");
    let c = ctx(&[]);
    let mut p = spawn_broker(&cfg, &[]);
    let mut op = connect_ready(&env, "eu-central/operator-admin", "eu-central", &p.addr).await;
    let k = create_key_as(&mut op, "k9", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    let pk = signing_key(&mut svc).await;
    let ct = encrypt(&mut svc, &k, b"load", &c).await.unwrap().ciphertext;

    // 4 concurrent clients decrypt as fast as they can; kill -9 mid-flight.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut cl = svc.clone();
        let (ct, acked) = (ct.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("t{t}-{i}");
                let mut req = tonic::Request::new(pb::DecryptRequest {
                    ciphertext: ct.clone(),
                    context: Default::default(),
                });
                req.metadata_mut()
                    .insert("x-request-id", id.parse().unwrap());
                match cl.crypto.decrypt(req).await {
                    Ok(_) => acked.lock().unwrap().push(id),
                    Err(_) => return,
                }
            }
        }));
    }
    while acked.lock().unwrap().len() < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    kill9(&mut p);
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    let log = env.dir.path().join("data/eu-central/audit.log");
    let recs = read_records(&log);
    let allowed: std::collections::HashSet<&str> = recs
        .iter()
        .filter(|r| r.operation == "decrypt" && r.outcome == "allowed")
        .map(|r| r.request_id.as_str())
        .collect();
    let missing: Vec<_> = acked
        .iter()
        .filter(|id| !allowed.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged decrypts have no record, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    // The killed writer left the room it makes ahead of its records
    // (zeros after the last record); readers stop there.
    let bytes = std::fs::read(&log).unwrap();
    let end = bytes.iter().position(|b| *b == 0).expect("room ahead");
    assert!(bytes[end..].iter().all(|b| *b == 0));
    assert_eq!(bytes[end - 1], b'\n');
    verify_file(&log, &pk, false).expect("chain after kill -9");

    // Restart: the log continues the same chain; a clean stop signs it.
    let mut p = spawn_broker(&cfg, &[]);
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    decrypt(&mut svc, &ct, &c).await.unwrap();
    stop(&mut p);
    let rep = verify_file(&log, &pk, true).expect("chain after restart");
    assert!(rep.records as usize > acked.len());
    // A clean stop leaves the file ending with its last record.
    let bytes = std::fs::read(&log).unwrap();
    assert!(!bytes.contains(&0) && bytes.ends_with(b"\n"));
}

/// Unmounts a tmpfs when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "this test needs root to mount a small tmpfs (a real full filesystem): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A broker of eu-central whose audit log is on a tmpfs of `size` of its
/// own (a real file system that fills up); `audit` is added to the
/// `[audit]` section. The mount goes when the first value is dropped.
async fn broker_with_audit_on_tmpfs(
    env: &Env,
    size: &str,
    audit: &str,
) -> (Tmpfs, std::path::PathBuf, TestBroker) {
    let fs_dir = env.dir.path().join("auditfs");
    let mnt = Tmpfs::mount(&fs_dir, size);
    let cfg = env.config_with_tail(
        "eu-central",
        &format!(
            "\n[audit]\npath = \"{}/audit.log\"\n{audit}",
            fs_dir.display()
        ),
    );
    let eu = start_broker_from(env, "eu-central", &cfg).await;
    (mnt, fs_dir, eu)
}

fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).and_then(|_| f.sync_all()).is_ok() {}
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_plaintext_and_recovers() {
    let env = Env::new();
    let (_mnt, fs_dir, eu) = broker_with_audit_on_tmpfs(&env, "256k", "").await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(&env, &eu, "disk", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let mut op = client(&env, "eu-central/operator-admin", &eu).await;
    let pk = signing_key(&mut svc).await;
    let c = ctx(&[]);
    let ct = encrypt(&mut svc, &k, b"keep me inside", &c)
        .await
        .unwrap()
        .ciphertext;
    assert_eq!(decrypt(&mut svc, &ct, &c).await.unwrap(), b"keep me inside");

    let filler = fill(&fs_dir);
    // The file's last page may still have room for a few records; every
    // decrypt that succeeds is durable, and then the disk runs out.
    let mut first_err = None;
    for _ in 0..200 {
        if let Err(e) = decrypt(&mut svc, &ct, &c).await {
            first_err = Some(e);
            break;
        }
    }
    let e = first_err.expect("the full filesystem never refused a record");
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(
        e.message().contains("audit log cannot be written"),
        "{}",
        e.message()
    );
    let e = svc
        .crypto
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: k.clone(),
            context: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let r = op
        .keys
        .create(pb::CreateKeyRequest {
            name: "no".into(),
            activate: true,
            ..Default::default()
        })
        .await;
    assert_eq!(
        code(&r),
        Code::Unavailable,
        "lifecycle changes need a durable record too"
    );

    std::fs::remove_file(filler).unwrap();
    assert_eq!(decrypt(&mut svc, &ct, &c).await.unwrap(), b"keep me inside");
    let path = eu.audit_path.clone();
    eu.stop().await;
    verify_file(&path, &pk, true).expect("no partial record may remain after the failed writes");
}

fn free_bytes(dir: &Path) -> u64 {
    let s = rustix::fs::statvfs(dir).unwrap();
    s.f_bavail * s.f_frsize
}

fn log_bytes(active: &Path) -> u64 {
    let mut n = std::fs::metadata(active).map_or(0, |m| m.len());
    for (_, p) in audit::segments::closed(active).unwrap() {
        n += std::fs::metadata(p).unwrap().len();
    }
    n
}

/// A caller flooding the broker with requests whose records nobody waits
/// for (encrypts here; refusals alike) cannot use up the space kept for
/// plaintext releases: below the reserve they are counted, not written,
/// and decrypts go on with their durable records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_reserve_buffered_records_are_shed_and_decrypts_go_on() {
    let env = Env::new();
    let (_mnt, fs_dir, eu) = broker_with_audit_on_tmpfs(&env, "4m", "reserve_mib = 2\n").await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(&env, &eu, "reserve", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let pk = signing_key(&mut svc).await;
    let c = ctx(&[]);
    let ct = encrypt(&mut svc, &k, b"released in-region only", &c)
        .await
        .unwrap()
        .ciphertext;

    // Leave 1.5 MiB: below the 2 MiB reserve, room for many durable records.
    let filler = fs_dir.join("filler");
    let keep = 3 << 19;
    std::fs::write(&filler, vec![0u8; (free_bytes(&fs_dir) - keep) as usize]).unwrap();
    let before = log_bytes(&eu.audit_path);
    // 4000 encrypt records (about 2.5 MiB) would fill what is left.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (mut svc, k, c) = (svc.clone(), k.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..1000 {
                encrypt(&mut svc, &k, b"x", &c).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let grown = log_bytes(&eu.audit_path) - before;
    assert!(
        grown < 64 << 10,
        "the log grew by {grown} bytes below its reserve"
    );
    for _ in 0..20 {
        assert_eq!(
            decrypt(&mut svc, &ct, &c).await.unwrap(),
            b"released in-region only"
        );
    }
    assert!(free_bytes(&fs_dir) > 1 << 20);

    let path = eu.audit_path.clone();
    eu.stop().await;
    let text = std::io::read_to_string(audit::segments::open(&path).unwrap()).unwrap();
    let shed = text
        .lines()
        .map(|l| serde_json::from_str::<audit::Record>(l).unwrap())
        .find(|r| r.operation == "dropped-records")
        .expect("a record counts the records not written");
    assert!(shed.reason.contains("below the reserve"), "{}", shed.reason);
    verify_text(&text, &pk, true).expect("the chain stays whole");
}

/// The room the log makes ahead of its records never comes out of the
/// reserve: with free space above the reserve but within two steps of it,
/// the file grows with its records only, so the space stays for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_ahead_of_the_log_never_eats_into_the_reserve() {
    let env = Env::new();
    let (_mnt, fs_dir, eu) = broker_with_audit_on_tmpfs(&env, "8m", "reserve_mib = 2\n").await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(&env, &eu, "room", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let c = ctx(&[]);
    let ct = encrypt(&mut svc, &k, b"x", &c).await.unwrap().ciphertext;
    decrypt(&mut svc, &ct, &c).await.unwrap();
    // Plenty of space at first: the file took room ahead (zeros).
    let room = std::fs::metadata(&eu.audit_path).unwrap().len();
    assert!(room >= 1 << 20, "no room made ahead: {room} bytes");

    // Leave 3 MiB: above the 2 MiB reserve, below reserve + two steps.
    let keep = 3 << 20;
    std::fs::write(
        fs_dir.join("filler"),
        vec![0u8; (free_bytes(&fs_dir) - keep) as usize],
    )
    .unwrap();
    // Decrypt records (durable) well past the room made at first.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (mut svc, ct, c) = (svc.clone(), ct.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..500 {
                decrypt(&mut svc, &ct, &c).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let grown = std::fs::metadata(&eu.audit_path).unwrap().len();
    assert!(grown > room, "the records did not outgrow the first room");
    let free = free_bytes(&fs_dir);
    assert!(free >= 2 << 20, "the reserve was spent: {free} bytes free");
    eu.stop().await;
}

/// Readiness follows the audit disk: full, `/readyz` says not ready and
/// names the audit log; space back, ready again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_a_full_audit_disk_and_recovers() {
    let env = Env::new();
    let (_mnt, fs_dir, eu) = broker_with_audit_on_tmpfs(
        &env,
        "256k",
        "reserve_mib = 0\n\n[health]\ninterval_seconds = 1\ndeadline_seconds = 1\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let admin = eu.server.admin_addr.unwrap().to_string();
    wait_ready(&admin, 200, std::time::Duration::from_secs(10)).await;
    let filler = fill(&fs_dir);
    let why = wait_ready(&admin, 503, std::time::Duration::from_secs(30)).await;
    assert!(why.contains("audit: "), "{why}");
    let (_, metrics) = http_get(&admin, "/metrics").await;
    assert!(
        metrics.contains("sovkms_component_healthy{component=\"audit\"} 0"),
        "{metrics}"
    );
    std::fs::remove_file(filler).unwrap();
    wait_ready(&admin, 200, std::time::Duration::from_secs(10)).await;
    eu.stop().await;
}

/// A broker whose log rotated: each closed segment ends with a signed
/// checkpoint, an auditor's export from a sequence number in a later
/// segment starts exactly there, the whole export verifies, and so do the
/// files on disk read as one chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_log_exports_and_verifies_as_one_chain() {
    let env = Env::new();
    let cfg = env.config_with_tail(
        "eu-central",
        "\n[audit]\nsegment_mib = 1\ncheckpoint_every_records = 200\n",
    );
    let eu = start_broker_from(&env, "eu-central", &cfg).await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(&env, &eu, "rotating", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let pk = signing_key(&mut svc).await;
    let ct = encrypt(&mut svc, &k, b"x", &ctx(&[]))
        .await
        .unwrap()
        .ciphertext;
    // Durable records (decrypts), so each batch is on disk when answered.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (mut svc, ct) = (svc.clone(), ct.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..1500 {
                decrypt(&mut svc, &ct, &ctx(&[])).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let closed = audit::segments::closed(&eu.audit_path).unwrap();
    assert!(closed.len() >= 2, "{closed:?}");
    let from = closed[1].0 + 7;
    let mut aud = client(&env, "eu-central/auditor-audit", &eu).await;
    let mut s = aud
        .audit
        .export_records(pb::ExportRecordsRequest {
            from_seq: from,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    let r: audit::Record = serde_json::from_str(&first.line).unwrap();
    assert_eq!(r.seq, from);
    drop(s);
    let mut all = String::new();
    let mut s = aud
        .audit
        .export_records(pb::ExportRecordsRequest::default())
        .await
        .unwrap()
        .into_inner();
    while let Some(l) = s.message().await.unwrap() {
        all.push_str(&l.line);
        all.push('\n');
    }
    let rep = verify_text(&all, &pk, false).expect("the export verifies across segments");
    assert!(rep.records > 6000 && rep.checkpoints >= 25, "{rep:?}");
    let path = eu.audit_path.clone();
    eu.stop().await;
    // The auditor's offline command, given the active file, reads the
    // closed segments beside it.
    let pk_file = env.dir.path().join("signing.hex");
    std::fs::write(&pk_file, hex::encode(&pk)).unwrap();
    let o = run_sovkms(
        &[
            "audit",
            "verify",
            "--log",
            path.to_str().unwrap(),
            "--pubkey",
            pk_file.to_str().unwrap(),
            "--require-checkpoint",
        ],
        &[],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(&format!("{} records", rep.records + 1)) || out.starts_with("OK: "),
        "{out}"
    );
}
