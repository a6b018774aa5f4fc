//! Wires the command line to the library; the only place that decides exit codes.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use kube_port_forward::cli::{self, Cli};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = if cli.verbose {
        LevelFilter::DEBUG
    } else {
        LevelFilter::INFO
    };
    // Under systemd with stderr going to the journal, log to journald with structured fields
    // (`journalctl ACTION=close`); elsewhere (procd's logd, a terminal) plain lines on stderr.
    let journald = stderr_is_journal()
        .then(tracing_journald::layer)
        .and_then(Result::ok);
    match journald {
        Some(layer) => tracing_subscriber::registry()
            .with(
                layer
                    .with_syslog_identifier("kube-port-forward".into())
                    .with_field_prefix(None),
            )
            .with(level)
            .init(),
        None => tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(level)
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
    }
    let nft = kube_port_forward::kernel::NftCli::new(
        cli.nft,
        std::time::Duration::from_secs(cli.nft_timeout),
    );
    match cli::run(cli.command, nft) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let mut message = format!("error: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                // Some errors (kube's kubeconfig ones) already say their cause: once is enough.
                let text = cause.to_string();
                if !message.ends_with(&text) {
                    message.push_str(&format!(": {text}"));
                }
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::from(err.exit_code())
        }
    }
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM` to its
/// `device:inode`, and a child that redirected stderr no longer matches.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", stderr.dev(), stderr.ino())
}
