//! The `nft` runner, for what is rare: building or rebuilding the table from a JSON
//! transaction. Each run has a deadline (a hung `nft` is killed and counts as a failure) and
//! its stderr goes into the error. Spawned here rather than with the `nftables` crate's
//! helper, which has neither.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long one `nft` run may take unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed `nft` run.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("could not run {program:?}")]
    Spawn {
        program: OsString,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("{command} did not finish within {seconds} s and was killed")]
    Timeout { command: String, seconds: u64 },
}

/// The `nft` program, found in `PATH` unless named.
#[derive(Clone, Debug)]
pub struct NftCli {
    program: Option<OsString>,
    timeout: Duration,
}

impl Default for NftCli {
    fn default() -> NftCli {
        NftCli::new(None, DEFAULT_TIMEOUT)
    }
}

/// What one finished run printed.
struct Ran {
    status: ExitStatus,
    stderr: String,
}

impl NftCli {
    pub fn new(program: Option<OsString>, timeout: Duration) -> NftCli {
        NftCli { program, timeout }
    }

    /// Runs the program with `args`, `input` on its standard input, killing it at the
    /// deadline. Its stderr is read by a thread of its own, so a full pipe never stalls
    /// it; a killed run's readers are left to end with the pipes.
    fn run(&self, command: &str, args: &[&str], input: Option<&str>) -> Result<Ran, NftError> {
        let program = self.program();
        let mut child = Command::new(&program)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| NftError::Spawn { program, source })?;
        let stdin = child.stdin.take();
        let input = input.map(str::to_owned);
        let writer = std::thread::spawn(move || {
            if let (Some(mut stdin), Some(input)) = (stdin, input) {
                // A closed pipe means nft stopped reading: its status says why.
                let _ = stdin.write_all(input.as_bytes());
            }
        });
        let reader = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_string(&mut text);
                }
                text
            })
        };
        let stderr = reader(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(NftError::Timeout {
                        command: command.to_owned(),
                        seconds: self.timeout.as_secs(),
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_micros(500)),
                Err(source) => {
                    return Err(NftError::Spawn {
                        program: self.program(),
                        source,
                    });
                }
            }
        };
        let _ = writer.join();
        Ok(Ran {
            status,
            stderr: stderr.join().unwrap_or_default(),
        })
    }

    fn program(&self) -> OsString {
        self.program.clone().unwrap_or_else(|| "nft".into())
    }
}

fn failed(command: String, ran: &Ran) -> NftError {
    let stderr = ran.stderr.trim();
    NftError::Failed {
        command,
        stderr: if stderr.is_empty() {
            format!("{} and printed nothing on stderr", ran.status)
        } else {
            stderr.to_owned()
        },
    }
}

impl NftCli {
    /// Runs one JSON transaction with `nft -j -f -`: one kernel transaction.
    pub fn run_transaction(&mut self, transaction: &str) -> Result<(), NftError> {
        let command = format!("{} -j -f -", self.program().to_string_lossy());
        tracing::debug!(%command, bytes = transaction.len(), "sending a transaction");
        let ran = self.run(&command, &["-j", "-f", "-"], Some(transaction))?;
        if ran.status.success() {
            Ok(())
        } else {
            Err(failed(command, &ran))
        }
    }
}
