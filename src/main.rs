//! The `sovkms` binary: parse arguments, hand over to `cli`.

/// mimalloc instead of glibc's malloc: see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sovkms::cli::main()
}
