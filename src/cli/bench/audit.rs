//! `bench audit`: durable against buffered appends on the real log file.

use super::*;

/// Durable appends by 1..64 concurrent writers against buffered appends,
/// on the real log file (software root signs the checkpoints).
pub(super) fn audit(seconds: f64, dir: &Path) -> Result<(), CliError> {
    use crate::audit::{AuditLog, AuditSink, Event, Kind, LogSettings};
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(err)?;
    }
    std::fs::create_dir_all(dir).map_err(err)?;
    let root = Arc::new(
        crate::root::software::SoftwareRoot::open_or_create(&dir.join("root")).map_err(err)?,
    );
    let settings = || LogSettings {
        path: dir.join("audit.log"),
        region: "eu-central".into(),
        broker_id: "bench".into(),
        checkpoint_every: 1000,
        checkpoint_interval: Duration::from_secs(60),
        witness: None,
        segment_bytes: 64 << 20,
        reserve_bytes: 0,
        table: None,
    };
    let log = Arc::new(
        AuditLog::open(
            settings(),
            Arc::clone(&root) as Arc<dyn crate::root::RootOfTrust>,
        )
        .map_err(err)?,
    );
    let ev = || {
        let mut e = Event::system(Kind::Request, "decrypt", "");
        e.key_id = "k-0123456789abcdef0123456789abcdef".into();
        e.context_sha256 = "ab".repeat(32);
        e.request_id = "0123456789abcdef01234567".into();
        e
    };
    let dur = Duration::from_secs_f64(seconds);
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "sovkms bench audit: {ncpu} cores, {seconds}s per figure, file {}",
        dir.join("audit.log").display()
    );
    // Buffered: the rate counts until the writer has written them all (a
    // durable append at the end waits behind every one of them).
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        for _ in 0..100 {
            log.append(ev());
        }
        n += 100;
        // Waiting for one durable append now and then keeps the queue
        // below its bound (beyond it, buffered records are dropped).
        if n % 10_000 == 0 {
            log.append_durable(ev()).map_err(err)?;
        }
    }
    log.append_durable(ev()).map_err(err)?;
    let buffered = n as f64 / start.elapsed().as_secs_f64();
    println!("buffered appends (nobody waits):   {buffered:>10.0} records/s written");
    for writers in [1usize, 8, 64] {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..writers)
                .map(|_| {
                    let log = Arc::clone(&log);
                    s.spawn(move || {
                        let mut n = 0u64;
                        while start.elapsed() < dur {
                            if log.append_durable(ev()).is_ok() {
                                n += 1;
                            }
                        }
                        n
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        let rate = total as f64 / start.elapsed().as_secs_f64();
        println!(
            "durable appends, {writers:>2} waiting writers: {rate:>10.0} records/s ({:.2} ms per acknowledged record per writer)",
            writers as f64 * 1000.0 / rate.max(1.0)
        );
    }
    log.close();
    drop(log);
    // What a start costs on this log: the whole chain is verified first.
    let records = crate::audit::complete_lines(std::io::BufReader::new(
        crate::audit::segments::open(&dir.join("audit.log")).map_err(err)?,
    ))
    .count();
    let start = Instant::now();
    AuditLog::open(settings(), root).map_err(err)?.close();
    let took = start.elapsed().as_secs_f64();
    println!(
        "start on this log (whole chain verified): {took:.2} s for {records} records ({:.0} records/s)",
        records as f64 / took
    );
    Ok(())
}
