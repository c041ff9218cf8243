//! `keygate`: parse the command line and hand over to the library.

#![forbid(unsafe_code)]

use clap::Parser;

/// glibc's allocator spent ~12% of keygate's CPU on the hot path (a request is a few
/// dozen short-lived allocations: decoded headers, the answer) and consolidating its free
/// lists showed up as latency spikes; mimalloc's thread-local free lists do not
/// (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = keygate::cli::Cli::parse();
    match keygate::cli::run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("keygate: {e:#}");
            std::process::exit(1);
        }
    }
}
