//! The router's own sockets, followed: the kernel announces no new listening socket, so they
//! are read every [`POLL`] on a thread of their own, and a change is sent to the daemon. A
//! service the router starts after the daemon (sshd on another port, WireGuard brought up
//! late at boot) is seen within a poll, and the daemon reads once more right before any
//! change that opens a port, so a port is never opened over a socket that listens on it.
//!
//! Reads are ordered: the thread's and the daemon's go through one reader under one lock and
//! publish what they read at once, so a slow periodic read never overwrites a newer one.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::sockets::{Bound, Reader};

/// How often the sockets are read: a late listener is protected within this.
pub const POLL: Duration = Duration::from_secs(1);

type Shared = Arc<Mutex<(Reader, watch::Sender<BTreeSet<Bound>>)>>;

/// The sockets last read, and their changes.
pub struct ServedPorts {
    shared: Shared,
    receiver: watch::Receiver<BTreeSet<Bound>>,
}

impl ServedPorts {
    /// Starts the reading thread; the first read is the daemon's own ([`ServedPorts::read_now`]).
    pub fn start() -> ServedPorts {
        let (sender, receiver) = watch::channel(BTreeSet::new());
        let shared: Shared = Arc::new(Mutex::new((Reader::new(), sender)));
        let polled = shared.clone();
        std::thread::Builder::new()
            .name("served-ports".into())
            .spawn(move || poll(&polled))
            .expect("a thread can be started");
        ServedPorts { shared, receiver }
    }

    /// Reads the sockets now, and takes what was read as seen.
    pub fn read_now(&mut self) -> io::Result<BTreeSet<Bound>> {
        read(&self.shared)?;
        Ok(self.receiver.borrow_and_update().clone())
    }

    /// Waits until a read finds other sockets than those seen last.
    pub async fn changed(&mut self) -> BTreeSet<Bound> {
        if self.receiver.changed().await.is_err() {
            // The thread never stops while the daemon holds the channel.
            std::future::pending::<()>().await;
        }
        self.receiver.borrow_and_update().clone()
    }
}

/// One read, published when it differs from the last.
fn read(shared: &Shared) -> io::Result<()> {
    let mut guard = shared.lock().unwrap_or_else(PoisonError::into_inner);
    let (reader, sender) = &mut *guard;
    let sockets = reader.listening()?;
    sender.send_if_modified(|known| {
        let changed = *known != sockets;
        if changed {
            *known = sockets;
        }
        changed
    });
    Ok(())
}

/// Reads every [`POLL`] until the daemon is gone; a failing read is said once per streak and
/// keeps what is known.
fn poll(shared: &Shared) {
    let mut failing = false;
    loop {
        std::thread::sleep(POLL);
        if shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .is_closed()
        {
            return;
        }
        match read(shared) {
            Ok(()) => failing = false,
            Err(error) if !failing => {
                failing = true;
                tracing::error!(%error, "cannot read the ports the router serves; keeping the known ones");
            }
            Err(_) => {}
        }
    }
}
