//! `ticketlock`: the command line tool. The library never prints; this does.

mod cli;

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    cli::install_panic_hook();
    let cli = match cli::Cli::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    cli::init_tracing(cli.verbose);
    match cli.run().await {
        Ok(code) => code,
        Err(error) => {
            cli::print_error(&error.to_string());
            error.exit_code()
        }
    }
}
