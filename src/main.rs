//! The `sovkms` binary: parse arguments, hand over to `cli`.

fn main() -> std::process::ExitCode {
    sovkms::cli::main()
}
