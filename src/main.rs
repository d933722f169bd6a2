//! The `mmsend` binary: parse the command line, run it, turn errors into a
//! message and an exit code (0 ok, 1 partly failed, 2 usage or fatal; see
//! `mmsend --help`). A closed pipe ends it quietly with 0.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    mmsend::report::exit_quietly_on_closed_pipe();
    let cli = mmsend::cli::Cli::parse();
    mmsend::cli::init_logging(&cli);
    let runtime = match mmsend::cli::runtime(&cli) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = mmsend::report::eprint(format_args!(
                "error: cannot start the async runtime: {e} (out of threads or memory?)"
            ));
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(mmsend::cli::run(cli)) {
        Ok(code) => code,
        Err(e) if mmsend::report::is_closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // stderr may be closed too; there is no one left to tell then
            let _ = mmsend::report::eprint(format_args!("error: {e:#}"));
            ExitCode::from(2)
        }
    }
}
