//! `bench tpm`: unseal and quote latency on the configured TPM.

use super::*;

pub(super) fn tpm_bench(config: &std::path::Path, rounds: usize) -> Result<(), CliError> {
    use crate::config::Settings;
    use crate::root::tpm;
    let s = Settings::load(config).map_err(|e| CliError::new(e.to_string(), "fix the config"))?;
    let t = s
        .tpm
        .clone()
        .ok_or_else(|| CliError::new("the config has no [tpm] section", ""))?;
    let (path, purpose) = s
        .tpm_sealed()
        .ok_or_else(|| CliError::new("the config seals nothing to the TPM", ""))?;
    let err = |e: crate::root::RootError| CliError::new(e.message, "");
    let mut connect = Vec::with_capacity(rounds);
    let mut unseal = Vec::with_capacity(rounds);
    let mut quote = Vec::with_capacity(rounds);
    let nonce = [0x5au8; 16];
    for _ in 0..rounds {
        // The fixed part of both: open the TCTI and run one command.
        let t0 = Instant::now();
        tpm::Tpm::connect(&t.tcti)
            .and_then(|mut d| d.random(1))
            .map_err(err)?;
        connect.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        tpm::check(&t, &path, purpose).map_err(err)?;
        unseal.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        tpm::quote(&t, &nonce).map_err(err)?;
        quote.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    for (name, v) in [
        ("connect", &mut connect),
        ("unseal", &mut unseal),
        ("quote", &mut quote),
    ] {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        println!(
            "tpm {name:<7} {rounds} rounds via {}: min {:.1} ms, median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
            t.tcti,
            v[0],
            at(0.5),
            at(0.9),
            v[v.len() - 1]
        );
    }
    Ok(())
}
