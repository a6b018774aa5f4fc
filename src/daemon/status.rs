//! The status file `status` reads: the plan's entries, written on a thread of its own so a
//! slow flash never holds up the loop. The loop hands over each new set of entries; the
//! writer takes the latest (those handed over meanwhile are skipped) and replaces the file
//! whole.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::core::status::{ServiceEntry, StatusFile};

/// The loop's end of the writer.
pub(super) struct StatusWriter {
    slot: Arc<Slot>,
    thread: std::thread::JoinHandle<()>,
    /// The entries last handed over: the same ones are not written again.
    last: Option<Vec<ServiceEntry>>,
}

#[derive(Default)]
struct Slot {
    next: Mutex<Next>,
    changed: Condvar,
}

#[derive(Default)]
struct Next {
    /// The latest entries not written yet.
    entries: Option<Vec<ServiceEntry>>,
    stop: bool,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Next> {
        self.next.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StatusWriter {
    /// Starts the writer of `file` for this process, serving health on `health`.
    pub(super) fn start(file: PathBuf, health: Option<String>) -> StatusWriter {
        let slot = Arc::new(Slot::default());
        let writer = Writer {
            file,
            pid: std::process::id(),
            health,
            started: unix_now(),
            slot: slot.clone(),
        };
        StatusWriter {
            slot,
            thread: std::thread::spawn(move || writer.run()),
            last: None,
        }
    }

    /// Whether no entries were handed over yet.
    pub(super) fn empty(&self) -> bool {
        self.last.is_none()
    }

    /// Hands over the entries of a plan, unless they are those handed over last.
    pub(super) fn update(&mut self, entries: Vec<ServiceEntry>) {
        if self.last.as_ref() == Some(&entries) {
            return;
        }
        self.slot.lock().entries = Some(entries.clone());
        self.slot.changed.notify_one();
        self.last = Some(entries);
    }

    /// Stops the writer and removes the file (blocks until a write in progress ends).
    pub(super) fn finish(self) {
        self.slot.lock().stop = true;
        self.slot.changed.notify_one();
        let _ = self.thread.join();
    }
}

/// The writer's end, on its own thread.
struct Writer {
    file: PathBuf,
    pid: u32,
    health: Option<String>,
    started: u64,
    slot: Arc<Slot>,
}

impl Writer {
    fn run(self) {
        loop {
            let entries = {
                let mut next = self.slot.lock();
                while next.entries.is_none() && !next.stop {
                    next = self
                        .slot
                        .changed
                        .wait(next)
                        .unwrap_or_else(|p| p.into_inner());
                }
                if next.stop {
                    break;
                }
                next.entries.take().unwrap_or_default()
            };
            let status = StatusFile {
                pid: self.pid,
                health: self.health.clone(),
                started: self.started,
                written: unix_now(),
                services: entries,
            };
            if let Err(error) = write(&self.file, &status.json()) {
                tracing::warn!(%error, file = %self.file.display(), "cannot write the status for `status`");
            }
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Replaces `file` whole (a temporary file renamed over it), readable by all.
fn write(file: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = file.with_extension("tmp");
    std::fs::write(&temporary, text)?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&temporary, file)
}
