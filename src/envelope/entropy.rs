//! Randomness for salts and nonces.
//!
//! Two `getrandom` calls per message were a third of the envelope cost at
//! small payloads. [`BatchedRandom`] reads the kernel CSPRNG 4 KiB at a time
//! into a per-thread buffer and hands out each byte once: the same bytes the
//! kernel would have given, one syscall per ~90 messages. No userspace
//! generator is involved, so nothing needs reseeding; the buffer is never
//! shared between threads, and the broker never forks (children are
//! `exec`ed), so no two processes can hold the same buffer.

use std::cell::RefCell;

/// The random source failed; nothing may be sealed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the random number generator failed")]
pub struct EntropyError;

/// Something that fills buffers with unpredictable bytes.
pub trait Entropy {
    /// Fills `dest`, or fails (then nothing may be sealed).
    fn fill(&self, dest: &mut [u8]) -> Result<(), EntropyError>;
}

impl Entropy for ring::rand::SystemRandom {
    fn fill(&self, dest: &mut [u8]) -> Result<(), EntropyError> {
        ring::rand::SecureRandom::fill(self, dest).map_err(|_| EntropyError)
    }
}

const BATCH: usize = 4096;

struct Buffer {
    bytes: [u8; BATCH],
    used: usize,
}

thread_local! {
    static BUFFER: RefCell<Buffer> = const { RefCell::new(Buffer { bytes: [0; BATCH], used: BATCH }) };
}

/// Kernel randomness, fetched in batches per thread.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchedRandom;

impl Entropy for BatchedRandom {
    fn fill(&self, dest: &mut [u8]) -> Result<(), EntropyError> {
        if dest.len() > BATCH / 4 {
            return ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), dest)
                .map_err(|_| EntropyError);
        }
        BUFFER.with(|b| {
            let mut b = b.borrow_mut();
            if BATCH - b.used < dest.len() {
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b.bytes)
                    .map_err(|_| EntropyError)?;
                b.used = 0;
            }
            let start = b.used;
            dest.copy_from_slice(&b.bytes[start..start + dest.len()]);
            // Each byte is handed out once.
            b.bytes[start..start + dest.len()].fill(0);
            b.used += dest.len();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_repeats_within_or_across_batches() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut x = [0u8; 44];
            BatchedRandom.fill(&mut x).unwrap();
            assert!(seen.insert(x), "repeated output");
        }
        let mut big = [0u8; 2048];
        BatchedRandom.fill(&mut big).unwrap();
        assert!(big.iter().any(|b| *b != 0));
    }
}
