//! One long-lived `NETLINK_NETFILTER` socket: element batches guarded by the ruleset's
//! generation, dumps of the table, and conntrack entries. Blocking, like the rest of the
//! kernel lane, which runs on a thread of its own. The bytes are [`super::wire`]'s.
//!
//! One socket rather than one `nft` run per change: closing a netlink socket after a commit
//! makes the closing process wait for an RCU grace period (≈ 11 ms here), and `nft` opens
//! and closes one per run.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

use super::wire::{self, ChainInfo, Elem, Received, SetChange, SetInfo};

/// A reply to a request never takes this long; a socket waiting longer is broken.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Room for the replies to a batch and for a dump's datagrams (the kernel fills them up to
/// 32 KiB).
const RECEIVE_BUFFER: usize = 4 << 20;
/// How often one dump starts again because a commit interrupted it.
const READ_ATTEMPTS: usize = 20;
/// How often the whole table is read again because the generation moved meanwhile.
const TABLE_ATTEMPTS: usize = 5;
const ENOENT: i32 = 2;
const ERESTART: i32 = 85;

/// What went wrong talking to nf_tables.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("the ruleset changed since generation {0}; nothing was committed")]
    Changed(u32),
    #[error("the kernel refused the change to set {set}: {source}; nothing was committed")]
    Refused {
        set: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: the kernel's answer cannot be read")]
    Malformed { what: &'static str },
    #[error("reading: the kernel's answer changed underneath too many times in a row")]
    Unsettled,
}

/// The daemon's table as dumped, at one generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableDump {
    pub generation: u32,
    pub sets: Vec<SetInfo>,
    pub chains: Vec<ChainInfo>,
    /// `(chain, comment)` of each rule, in chain order.
    pub rules: Vec<(String, Option<String>)>,
    pub elements: BTreeMap<String, Vec<Elem>>,
    /// How many times the table was read to get one consistent copy (1: no commit met it).
    pub attempts: usize,
}

/// Whether a dumped object belongs to the inet table `table`: the kernel filters some dumps
/// by table (sets, rules) but not all (chains).
fn ours(message: &Received<'_>, table: &str) -> bool {
    message.family() == wire::NFPROTO_INET && message.attrs().table().as_deref() == Some(table)
}

/// A dump parser keeping the objects of the table `table`.
fn of_table<'a, T: 'a>(
    table: &'a str,
    parse: fn(&Received<'_>) -> Option<T>,
) -> impl Fn(&Received<'_>) -> Option<Vec<T>> + 'a {
    move |m| {
        Some(if ours(m, table) {
            parse(m).into_iter().collect()
        } else {
            Vec::new()
        })
    }
}

/// The socket, and the next sequence number.
pub struct Nfnl {
    socket: Socket,
    portid: u32,
    seq: u32,
    buffer: Vec<u8>,
}

/// Why a dump ended without its answer.
enum Dumped {
    Interrupted,
    Missing,
}

/// One pass over the table.
enum Read {
    Table(TableDump),
    Missing,
    /// Something read at the start was gone by the end.
    Changed,
}

impl Nfnl {
    pub fn open() -> io::Result<Nfnl> {
        let mut socket = Socket::new(protocols::NETLINK_NETFILTER)?;
        let address: SocketAddr = socket.bind_auto()?;
        // Errors come back without the whole failed message attached.
        socket.set_cap_ack(true)?;
        socket.set_ext_ack(true)?;
        if setsockopt(&socket, sockopt::RcvBufForce, &RECEIVE_BUFFER).is_err() {
            socket.set_rx_buf_sz(RECEIVE_BUFFER)?;
        }
        let timeout = TimeVal::new(REPLY_TIMEOUT.as_secs() as _, 0);
        setsockopt(&socket, sockopt::ReceiveTimeout, &timeout).map_err(io::Error::from)?;
        Ok(Nfnl {
            socket,
            portid: address.port_number(),
            seq: std::process::id().wrapping_mul(1 << 16),
            buffer: vec![0; 64 * 1024],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        // A batch is one datagram: let the send buffer hold it.
        if bytes.len() > 200 * 1024 {
            let _ = setsockopt(&self.socket, sockopt::SndBufForce, &(bytes.len() * 2));
        }
        let sent = self.socket.send(bytes, 0)?;
        if sent != bytes.len() {
            return Err(io::Error::other("netlink send was cut short"));
        }
        Ok(())
    }

    /// Receives one datagram into the buffer; returns its length.
    fn receive(&mut self) -> io::Result<usize> {
        let mut buffer = &mut self.buffer[..];
        self.socket.recv(&mut buffer, 0)
    }

    /// Sends a request answered by one message (`parse` reads it), followed by an
    /// acknowledgement when `acked` (the request asked for one), and waits for the end of
    /// its answer, so nothing of it is left queued. `Ok(None)`: the kernel answered
    /// `ENOENT`.
    fn ask<T>(
        &mut self,
        request: impl FnOnce(u32) -> Vec<u8>,
        acked: bool,
        parse: impl Fn(&Received<'_>) -> Option<T>,
    ) -> Result<Option<T>, NetlinkError> {
        let seq = self.next_seq();
        self.send(&request(seq))?;
        let mut answer = None;
        loop {
            let len = self.receive()?;
            for m in wire::messages(&self.buffer[..len]) {
                if m.seq != seq {
                    continue;
                }
                match m.error() {
                    Some(0) => return Ok(answer),
                    Some(ENOENT) => return Ok(None),
                    Some(code) => return Err(io::Error::from_raw_os_error(code).into()),
                    None => answer = parse(&m),
                }
                if !acked {
                    return Ok(answer);
                }
            }
        }
    }

    /// The ruleset's generation now.
    pub fn generation(&mut self) -> Result<u32, NetlinkError> {
        self.ask(wire::get_generation, false, wire::generation_of)?
            .ok_or(NetlinkError::Malformed { what: "generation" })
    }

    /// Sends `changes` to `table` as one batch, valid only at `generation` (when given).
    /// Every message is acknowledged; any error means nothing was committed. Returns the
    /// deleted elements as the kernel echoed them at the commit, with their counters.
    pub fn commit(
        &mut self,
        table: &str,
        changes: &[SetChange],
        generation: Option<u32>,
    ) -> Result<Vec<(String, Elem)>, NetlinkError> {
        let begin = self.next_seq();
        let mut seq = begin.wrapping_add(1);
        let mut messages = Vec::new();
        let mut sets = BTreeMap::new();
        for change in changes {
            let first = seq;
            for (index, m) in wire::element_messages(table, change, &mut seq)
                .into_iter()
                .enumerate()
            {
                sets.insert(first.wrapping_add(index as u32), change.set);
                messages.push(m);
            }
        }
        let end = seq;
        self.seq = end;
        self.send(&wire::batch(generation, begin, &messages, end))?;
        // The kernel handles the batch within the send: every answer is queued by now, the
        // echoes of deletions first, then one acknowledgement per message, or the error that
        // stopped it.
        let deleted_kind = (wire::SUBSYS_NFTABLES << 8) | u16::from(wire::NFT_MSG_DELSETELEM);
        let mut deleted = Vec::new();
        let mut acked = 0;
        while acked < messages.len() {
            let len = self.receive()?;
            let mut failed = None;
            for m in wire::messages(&self.buffer[..len]) {
                // Only answers to this batch's messages count.
                let answered = m.error_seq().unwrap_or(m.seq);
                if m.error().is_some() && answered.wrapping_sub(begin) > end.wrapping_sub(begin) {
                    continue;
                }
                match m.error() {
                    Some(0) => acked += 1,
                    Some(code) => {
                        failed = Some((code, answered));
                        break;
                    }
                    None if m.kind == deleted_kind && ours(&m, table) => {
                        if let Some((set, elems)) = wire::read_elements(&m) {
                            deleted.extend(elems.into_iter().map(|e| (set.clone(), e)));
                        }
                    }
                    None => {}
                }
            }
            if let Some((code, answered)) = failed {
                self.drain();
                if let (ERESTART, Some(generation)) = (code, generation) {
                    return Err(NetlinkError::Changed(generation));
                }
                return Err(NetlinkError::Refused {
                    set: sets.get(&answered).map_or("?", |s| *s).to_owned(),
                    source: io::Error::from_raw_os_error(code),
                });
            }
        }
        Ok(deleted)
    }

    /// Discards answers still queued (after an error, those to the rest of a batch).
    fn drain(&mut self) {
        let _ = self.socket.set_non_blocking(true);
        while self.receive().is_ok() {}
        let _ = self.socket.set_non_blocking(false);
    }

    /// Runs one dump request to its end, handing each message to `each`.
    fn dump(
        &mut self,
        request: impl FnOnce(u32) -> Vec<u8>,
        mut each: impl FnMut(&Received<'_>),
    ) -> Result<Result<(), Dumped>, NetlinkError> {
        let seq = self.next_seq();
        self.send(&request(seq))?;
        let mut interrupted = false;
        loop {
            let len = self.receive()?;
            let mut done = None;
            for m in wire::messages(&self.buffer[..len]) {
                if m.seq != seq || m.pid != self.portid {
                    continue;
                }
                interrupted |= m.flags & wire::NLM_F_DUMP_INTR != 0;
                match m.kind {
                    wire::NLMSG_DONE => done = Some(Ok(())),
                    wire::NLMSG_ERROR => match m.error() {
                        Some(0) | None => done = Some(Ok(())),
                        Some(ENOENT) => done = Some(Err(Dumped::Missing)),
                        Some(code) => return Err(io::Error::from_raw_os_error(code).into()),
                    },
                    _ => each(&m),
                }
            }
            match done {
                None => continue,
                Some(Ok(())) if interrupted => return Ok(Err(Dumped::Interrupted)),
                Some(result) => return Ok(result),
            }
        }
    }

    /// Runs a dump until the kernel does not flag it interrupted, collecting what `parse`
    /// finds in each message (`None`: a message it cannot read). `Ok(None)`: the object
    /// dumped is gone.
    fn dump_all<T>(
        &mut self,
        request: impl Fn(u32) -> Vec<u8>,
        parse: impl Fn(&Received<'_>) -> Option<Vec<T>>,
    ) -> Result<Option<Vec<T>>, NetlinkError> {
        for _ in 0..READ_ATTEMPTS {
            let mut found = Vec::new();
            let mut malformed = false;
            let result = self.dump(&request, |m| match parse(m) {
                Some(items) => found.extend(items),
                None => malformed = true,
            })?;
            if malformed {
                return Err(NetlinkError::Malformed { what: "dump" });
            }
            match result {
                Ok(()) => return Ok(Some(found)),
                Err(Dumped::Missing) => return Ok(None),
                Err(Dumped::Interrupted) => continue,
            }
        }
        Err(NetlinkError::Unsettled)
    }

    /// Reads the inet table `table` whole, `None` when there is none: its sets with the
    /// elements of those in `wanted`, chains and rules. Each dump is read again until the
    /// kernel does not flag it interrupted; the whole is read again while the ruleset's
    /// generation moves underneath, a few times. On a router that commits without pause the
    /// last read is taken as it is, at the generation it started from: a batch guarded by
    /// that generation is refused if anything changed since, so nothing is overwritten blind.
    pub fn read_table(
        &mut self,
        table: &str,
        wanted: &[&str],
    ) -> Result<Option<TableDump>, NetlinkError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let before = self.generation()?;
            let read = self.read_once(table, wanted)?;
            let settled = self.generation()? == before;
            match read {
                Read::Missing if settled => return Ok(None),
                Read::Table(dump) if settled || attempts >= TABLE_ATTEMPTS => {
                    return Ok(Some(TableDump {
                        generation: before,
                        attempts,
                        ..dump
                    }));
                }
                _ if attempts >= TABLE_ATTEMPTS => return Err(NetlinkError::Unsettled),
                _ => {}
            }
        }
    }

    fn read_once(&mut self, table: &str, wanted: &[&str]) -> Result<Read, NetlinkError> {
        // The table itself: a missing one answers ENOENT.
        let found = self.ask(|seq| wire::get_table(seq, table), true, |_| Some(()))?;
        if found.is_none() {
            return Ok(Read::Missing);
        }
        let Some(sets) = self.dump_all(
            |seq| wire::dump_request(wire::NFT_MSG_GETSET, seq, table, None),
            of_table(table, wire::read_set),
        )?
        else {
            return Ok(Read::Changed);
        };
        let Some(chains) = self.dump_all(
            |seq| wire::dump_request(wire::NFT_MSG_GETCHAIN, seq, table, None),
            of_table(table, wire::read_chain),
        )?
        else {
            return Ok(Read::Changed);
        };
        let Some(rules) = self.dump_all(
            |seq| wire::dump_request(wire::NFT_MSG_GETRULE, seq, table, None),
            of_table(table, wire::read_rule),
        )?
        else {
            return Ok(Read::Changed);
        };
        let mut elements = BTreeMap::new();
        for set in sets.iter().filter(|s| wanted.contains(&s.name.as_str())) {
            let elems = self.dump_all(
                |seq| wire::dump_request(wire::NFT_MSG_GETSETELEM, seq, table, Some(&set.name)),
                |m| match wire::read_elements(m) {
                    Some((_, elems)) if ours(m, table) => Some(elems),
                    Some(_) => Some(Vec::new()),
                    None => None,
                },
            )?;
            let Some(elems) = elems else {
                return Ok(Read::Changed);
            };
            elements.insert(set.name.clone(), elems);
        }
        Ok(Read::Table(TableDump {
            generation: 0,
            sets,
            chains,
            rules,
            elements,
            attempts: 0,
        }))
    }

    /// Deletes the conntrack entries carrying `mark` that `matches` picks; returns how many
    /// went. An entry already gone counts as gone.
    pub fn delete_flows(
        &mut self,
        mark: u32,
        matches: impl Fn(&wire::Flow) -> bool,
    ) -> Result<usize, NetlinkError> {
        let mut flows = Vec::new();
        for _ in 0..READ_ATTEMPTS {
            flows.clear();
            match self.dump(
                |seq| wire::conntrack_dump(seq, mark),
                |m| flows.extend(wire::read_flow(m).filter(|f| matches(f))),
            )? {
                // A table of flows changes all the time: an interrupted dump may have missed
                // some, so it is read again.
                Err(Dumped::Interrupted) => continue,
                Ok(()) | Err(Dumped::Missing) => break,
            }
        }
        if flows.is_empty() {
            return Ok(0);
        }
        let first = self.seq.wrapping_add(1);
        let mut datagram = Vec::new();
        for flow in &flows {
            let seq = self.next_seq();
            datagram.extend(wire::conntrack_delete(seq, flow));
        }
        self.send(&datagram)?;
        let mut answered = 0;
        let mut deleted = 0;
        while answered < flows.len() {
            let len = self.receive()?;
            for m in wire::messages(&self.buffer[..len]) {
                let Some(code) = m.error() else { continue };
                if m.error_seq().unwrap_or(m.seq).wrapping_sub(first) as usize >= flows.len() {
                    continue;
                }
                answered += 1;
                match code {
                    0 => deleted += 1,
                    ENOENT => {}
                    code => return Err(io::Error::from_raw_os_error(code).into()),
                }
            }
        }
        Ok(deleted)
    }
}
