//! The `mmsend` binary: parse the command line, run it, turn errors into a
//! message and an exit code.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = mmsend::cli::Cli::parse();
    mmsend::cli::init_logging(&cli);
    match mmsend::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
