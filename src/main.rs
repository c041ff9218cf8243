//! `keygate`: parse the command line and hand over to the library.

#![forbid(unsafe_code)]

use clap::Parser;

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
