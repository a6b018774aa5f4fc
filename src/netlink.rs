//! Multicast netlink subscriptions, shared by the kernel lane (nf_tables notifications) and
//! the router lane (rtnetlink address changes): a `netlink-sys` socket bound to some groups,
//! and a way to discard a burst already queued.

use std::io;

use netlink_sys::{AsyncSocket, SocketAddr, TokioSocket};

/// Room for a burst of notifications (a 10,000-forward rebuild sends one per element).
const RECEIVE_BUFFER: usize = 4 << 20;

/// A socket of `protocol` (`NETLINK_ROUTE`, `NETLINK_NETFILTER`) that hears `groups`.
pub fn subscribe(protocol: isize, groups: &[u32]) -> io::Result<TokioSocket> {
    let mut socket = TokioSocket::new(protocol)?;
    let inner = socket.socket_mut();
    inner.bind(&SocketAddr::new(0, 0))?;
    inner.set_rx_buf_sz(RECEIVE_BUFFER)?;
    for group in groups {
        inner.add_membership(*group)?;
    }
    Ok(socket)
}

/// Discards notifications already queued.
pub fn drain(socket: &mut TokioSocket) {
    let inner = socket.socket_mut();
    let _ = inner.set_non_blocking(true);
    let mut buffer = vec![0u8; 64 * 1024];
    while inner.recv(&mut &mut buffer[..], 0).is_ok() {}
}
