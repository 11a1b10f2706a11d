//! `bench file`: the streaming file format against raw AES-256-GCM.

use super::*;
use crate::file::{self as fmt, Header};
use crate::secret::KeyMaterial;
use std::io::Read;

/// `left` bytes of a fixed 64 KiB pattern, copied out as they are read
/// (as a page-cache read would copy them; no memory grows).
struct Pattern {
    left: u64,
    block: Vec<u8>,
}

impl Pattern {
    fn new(left: u64) -> Self {
        Self {
            left,
            block: (0..1u32 << 16)
                .map(|i| (i as u8).wrapping_mul(31))
                .collect(),
        }
    }
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(self.block.len())
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        buf[..n].copy_from_slice(&self.block[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn gib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / f64::from(1u32 << 30)
}

/// Raw AES-256-GCM over 64 KiB chunks of a buffer, in place: the ceiling.
fn raw(bytes: u64) -> Result<Duration, CliError> {
    use aws_lc_rs::aead;
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, &[9u8; 32]).map_err(|_| err("aead key"))?,
    );
    let mut buf = vec![0x5au8; 1 << 16];
    let start = Instant::now();
    let mut done = 0u64;
    let mut i = 0u64;
    while done < bytes {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&i.to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(n),
                aead::Aad::empty(),
                &mut buf,
            )
            .map_err(|_| err("seal"))?;
        let _ = std::hint::black_box(tag);
        done += buf.len() as u64;
        i += 1;
    }
    Ok(start.elapsed())
}

/// Raw AES-256-GCM opening of one sealed 64 KiB chunk, copied in before
/// each open (as a read would bring it): the opening ceiling.
fn raw_open(bytes: u64) -> Result<Duration, CliError> {
    use aws_lc_rs::aead;
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, &[9u8; 32]).map_err(|_| err("aead key"))?,
    );
    let nonce = || aead::Nonce::assume_unique_for_key([3u8; 12]);
    let mut sealed = vec![0x5au8; 1 << 16];
    let tag = key
        .seal_in_place_separate_tag(nonce(), aead::Aad::empty(), &mut sealed)
        .map_err(|_| err("seal"))?;
    sealed.extend_from_slice(tag.as_ref());
    let mut buf = vec![0u8; sealed.len()];
    let start = Instant::now();
    let mut done = 0u64;
    while done < bytes {
        buf.copy_from_slice(&sealed);
        let pt = key
            .open_in_place(nonce(), aead::Aad::empty(), &mut buf)
            .map_err(|_| err("open"))?;
        done += pt.len() as u64;
    }
    Ok(start.elapsed())
}

pub(super) fn file(bytes: u64, dir: &Path) -> Result<(), CliError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(err)?;
    }
    std::fs::create_dir_all(dir).map_err(err)?;
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let many = fmt::default_threads();
    let key = KeyMaterial::from_array(&mut [7u8; 32]);
    let header = Header::new("eu-central", "k-bench", vec![0u8; 160]).map_err(err)?;
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    println!(
        "sovkms bench file: {} MiB, {ncpu} cores, 64 KiB segments, 1 and {many} threads",
        mib(bytes)
    );
    let seal_to_sink = |n: u64, threads: usize| -> Result<Duration, CliError> {
        let start = Instant::now();
        fmt::seal(
            &header,
            &key,
            &mut Pattern::new(n),
            &mut std::io::sink(),
            &mut |_| {},
            threads,
        )
        .map_err(err)?;
        Ok(start.elapsed())
    };
    // Memory first, with nothing big allocated yet: the small size, then
    // the large one; equal peaks mean constant memory.
    let small = bytes / 10;
    seal_to_sink(small, many)?;
    let rss_small = peak_rss_mib();
    seal_to_sink(bytes, many)?;
    let rss_large = peak_rss_mib();
    let raw_t = raw(bytes)?;
    let raw_open_t = raw_open(bytes)?;
    let (raw_r, raw_o) = (gib_s(bytes, raw_t), gib_s(bytes, raw_open_t));
    println!("raw AES-256-GCM seal, one thread (64 KiB chunks, in place)  {raw_r:>6.2} GiB/s");
    println!("raw AES-256-GCM open, one thread (64 KiB chunks, copied in) {raw_o:>6.2} GiB/s");
    // Opening from memory: the ciphertext held in a buffer.
    let mut sealed = Vec::with_capacity(usize::try_from(bytes).unwrap_or(0) + (1 << 22));
    fmt::seal(
        &header,
        &key,
        &mut Pattern::new(bytes),
        &mut sealed,
        &mut |_| {},
        many,
    )
    .map_err(err)?;
    for threads in [1, many] {
        let seal_t = seal_to_sink(bytes, threads)?;
        let start = Instant::now();
        let mut input = &sealed[..];
        let h = Header::read(&mut input).map_err(err)?;
        let n = fmt::open(
            &h,
            &key,
            &mut input,
            &mut std::io::sink(),
            &mut |_| {},
            threads,
        )
        .map_err(err)?;
        let open_t = start.elapsed();
        if n != bytes {
            return Err(err(format!("opened {n} bytes of {bytes}")));
        }
        for (what, t, ceiling) in [("seal", seal_t, raw_r), ("open", open_t, raw_o)] {
            let r = gib_s(bytes, t);
            println!(
                "{what}, memory → /dev/null, {threads} thread(s){:<20} {r:>6.2} GiB/s  {:.2}× raw",
                "",
                r / ceiling
            );
        }
    }
    drop(sealed);
    // Through the disk: seal into a file (synced), open it to /dev/null.
    let path = dir.join("bench.svkf");
    let start = Instant::now();
    {
        let mut out = std::fs::File::create(&path).map_err(err)?;
        fmt::seal(
            &header,
            &key,
            &mut Pattern::new(bytes),
            &mut out,
            &mut |_| {},
            many,
        )
        .map_err(err)?;
        out.sync_all().map_err(err)?;
    }
    let seal_disk = gib_s(bytes, start.elapsed());
    let start = Instant::now();
    let mut input = std::fs::File::open(&path).map_err(err)?;
    let h = Header::read(&mut std::io::Read::by_ref(&mut input)).map_err(err)?;
    fmt::open(
        &h,
        &key,
        &mut input,
        &mut std::io::sink(),
        &mut |_| {},
        many,
    )
    .map_err(err)?;
    let open_disk = gib_s(bytes, start.elapsed());
    std::fs::remove_file(&path).map_err(err)?;
    println!(
        "seal, memory → file on disk (synced), {many} thread(s)        {seal_disk:>6.2} GiB/s"
    );
    println!(
        "open, file (page cache) → /dev/null, {many} thread(s)         {open_disk:>6.2} GiB/s"
    );
    println!(
        "peak resident memory: {:.1} MiB after {:.0} MiB, {:.1} MiB after {:.0} MiB (constant: segments are streamed)",
        rss_small,
        mib(small),
        rss_large,
        mib(bytes)
    );
    Ok(())
}
