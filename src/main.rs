//! Wires the command line to the library; the only place that decides exit codes.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use kube_port_forward::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(if cli.verbose {
            tracing::Level::DEBUG
        } else {
            tracing::Level::INFO
        })
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let nft = kube_port_forward::nft::NftCli::new(cli.nft);
    match cli::run(cli.command, nft) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let mut message = format!("error: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::from(err.exit_code())
        }
    }
}
