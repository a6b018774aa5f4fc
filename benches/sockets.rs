//! Reading the router's own listening sockets, as the daemon does every second and before a
//! port opens: a `NETLINK_SOCK_DIAG` dump (the kernel keeps only listening TCP and unconnected
//! UDP sockets) against reading and parsing `/proc/net/{tcp,tcp6,udp,udp6}` (every socket),
//! with 20 listeners and 0, 1,000 and 5,000 established connections beside them. Runs in a
//! network namespace it creates: needs root. `cargo bench --bench sockets`

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::Netns;
use kube_port_forward::router::sockets;

const READS: usize = 200;

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn time(mut read: impl FnMut() -> usize, expect: usize) -> (Duration, Duration) {
    let samples = (0..READS)
        .map(|_| {
            let started = Instant::now();
            let found = read();
            let took = started.elapsed();
            assert!(found >= expect, "{found} sockets read, {expect} expected");
            took
        })
        .collect();
    percentiles(samples)
}

fn main() {
    let ns = Netns::new("sockets");
    let lines = ns.enter(|| {
        let mut lines = Vec::new();
        let mut kept = Vec::new();
        for _ in 0..10 {
            kept.push(TcpListener::bind("0.0.0.0:0").unwrap());
        }
        let udp: Vec<UdpSocket> = (0..10)
            .map(|_| UdpSocket::bind("[::]:0").unwrap())
            .collect();
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let mut connections = Vec::new();
        for established in [0, 1000, 5000] {
            while connections.len() < established {
                let client = TcpStream::connect(to).unwrap();
                let (accepted, _) = server.accept().unwrap();
                connections.push((client, accepted));
            }
            let listening = kept.len() + udp.len() + 1;
            let mut reader = sockets::Reader::new();
            let (diag50, diag99) = time(|| reader.listening().unwrap().len(), listening);
            let (proc50, proc99) = time(|| sockets::from_proc().unwrap().len(), listening);
            lines.push(format!(
                "{established:>5} established: sock_diag p50 {diag50:>9.1?} p99 {diag99:>9.1?}   /proc/net p50 {proc50:>9.1?} p99 {proc99:>9.1?}"
            ));
        }
        lines
    });
    println!("reading the listening sockets ({READS} reads each)");
    for line in lines {
        println!("{line}");
    }
}
