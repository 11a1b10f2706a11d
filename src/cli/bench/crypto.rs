//! `bench crypto`: the envelope against raw AES-256-GCM of three libraries.

use super::*;

pub(super) fn crypto(seconds: f64, json: Option<PathBuf>) -> Result<(), CliError> {
    use crate::envelope::{self, EncryptionContext, Envelope};
    use crate::keys::KeyId;
    use crate::secret::{KeyMaterial, Plaintext};
    use aes_gcm::aead::AeadInPlace;
    use aes_gcm::KeyInit;
    use aws_lc_rs::aead as lc;
    use ring::aead;
    let kek = envelope::Kek::new(KeyMaterial::from_slice(&[7u8; 32]).ok_or_else(|| err("key"))?)
        .map_err(err)?;
    let region = Region::parse("eu-central").map_err(err)?;
    let kid = KeyId::parse("k-bench").map_err(err)?;
    let ctx = EncryptionContext::new([("a".to_string(), "b".to_string())]).map_err(err)?;
    let rng = ring::rand::SystemRandom::new();
    let ring_key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, &[7u8; 32]).map_err(|_| err("key"))?,
    );
    let lc_key = lc::LessSafeKey::new(
        lc::UnboundKey::new(&lc::AES_256_GCM, &[7u8; 32]).map_err(|_| err("key"))?,
    );
    let rc = aes_gcm::Aes256Gcm::new_from_slice(&[7u8; 32]).map_err(|_| err("key"))?;
    let dur = Duration::from_secs_f64(seconds);
    let rate = |f: &mut dyn FnMut() -> bool| -> f64 {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < dur {
            for _ in 0..16 {
                if f() {
                    n += 1;
                }
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("sovkms bench crypto: one thread, {seconds}s per figure, {ncpu} cores");
    println!(
        "raw = AES-256-GCM sealing in place with a fixed key; ×best = envelope seal or \
         open (per-message key, header, fresh output buffer) over the fastest raw seal"
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "bytes",
        "seal MB/s",
        "open MB/s",
        "ring raw",
        "aws-lc raw",
        "aes-gcm",
        "seal×best",
        "open×best",
        "derive µs",
        "alg1 µs"
    );
    let mut rows = Vec::new();
    for size in [64usize, 1024, 16 * 1024, 1024 * 1024] {
        let pt = vec![0x42u8; size];
        let sealed = envelope::seal(
            &rng,
            &kek,
            &region,
            &kid,
            1,
            &ctx,
            &Plaintext::new(pt.clone()),
        )
        .map_err(err)?;
        let env = Envelope::parse(&sealed).map_err(err)?;
        // The caller's plaintext is reused: seal reads it, and zeroizing the
        // caller's buffer is the caller's cost, once per request.
        let owned = Plaintext::new(pt.clone());
        let seal = rate(&mut || {
            envelope::seal(
                &crate::envelope::BatchedRandom,
                &kek,
                &region,
                &kid,
                1,
                &ctx,
                &owned,
            )
            .is_ok()
        });
        let derive = rate(&mut || envelope::derive_only(&kek, &env).is_ok());
        // Algorithm 1 (read only): the per-message extract it pays.
        let legacy = envelope::seal_with_header(
            &kek,
            &envelope::Header {
                algorithm: envelope::ALG_AES256GCM_HKDF_SHA256,
                ..env.header.clone()
            },
            &ctx,
            &pt,
        )
        .map_err(err)?;
        let legacy = Envelope::parse(&legacy).map_err(err)?;
        let derive_v1 = rate(&mut || envelope::derive_only(&kek, &legacy).is_ok());
        let open = rate(&mut || envelope::open(&kek, &env, &ctx).is_ok());
        let mut buf = pt.clone();
        let mut nonce = 0u64;
        let mut next_nonce = || {
            nonce += 1;
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&nonce.to_be_bytes());
            n
        };
        let ring_rate = rate(&mut || {
            buf.truncate(size);
            ring_key
                .seal_in_place_append_tag(
                    aead::Nonce::assume_unique_for_key(next_nonce()),
                    aead::Aad::from(b"hdr"),
                    &mut buf,
                )
                .is_ok()
        });
        let lc_rate = rate(&mut || {
            buf.truncate(size);
            lc_key
                .seal_in_place_append_tag(
                    lc::Nonce::assume_unique_for_key(next_nonce()),
                    lc::Aad::from(b"hdr"),
                    &mut buf,
                )
                .is_ok()
        });
        let rc_rate = rate(&mut || {
            buf.truncate(size);
            rc.encrypt_in_place(aes_gcm::Nonce::from_slice(&next_nonce()), b"hdr", &mut buf)
                .is_ok()
        });
        let mb = |r: f64| r * size as f64 / 1e6;
        let best = ring_rate.max(lc_rate).max(rc_rate);
        println!(
            "{:>8} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            size,
            mb(seal),
            mb(open),
            mb(ring_rate),
            mb(lc_rate),
            mb(rc_rate),
            seal / best,
            open / best,
            1e6 / derive,
            1e6 / derive_v1
        );
        rows.push(serde_json::json!({"bytes": size, "seal_per_s": seal, "open_per_s": open, "derive_us": 1e6 / derive, "alg1_derive_us": 1e6 / derive_v1, "ring_aes_gcm_per_s": ring_rate, "aws_lc_aes_gcm_per_s": lc_rate, "rustcrypto_aes_gcm_per_s": rc_rate, "seal_ratio_to_best": seal / best, "open_ratio_to_best": open / best}));
    }
    write_rows(json.as_deref(), ncpu, rows)
}
