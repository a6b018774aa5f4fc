//! Forwards, rulesets and a firewall in memory for the kernel lane's unit tests.

use std::net::IpAddr;

use super::nfnl::{NetlinkError, TableDump};
use super::wire::{Elem, Op, SetChange};
use super::{DEFAULT_TABLE, Firewall, KernelError, Ruleset, TableConfig};
use crate::core::model::{Family, Forward, ForwardKey, Owner, Protocol};

pub fn forward(port: u16, addr: &str, name: &str) -> Forward {
    let addr: IpAddr = addr.parse().unwrap();
    Forward {
        key: ForwardKey {
            family: Family::of(addr),
            protocol: Protocol::Tcp,
            external_port: port,
        },
        backends: vec![addr],
        port: 8080,
        down: Vec::new(),
        probe: None,
        owner: Owner {
            namespace: "ns".into(),
            name: name.into(),
            uid: Some("0000-1111".into()),
            service_port: "http".into(),
        },
        sources: Vec::new(),
    }
}

pub fn ruleset(forwards: &[Forward]) -> Ruleset {
    let config = TableConfig::new(
        DEFAULT_TABLE,
        ["wan".to_owned()],
        ["203.0.113.1".parse().unwrap()],
    )
    .unwrap();
    Ruleset::new(
        config,
        forwards.iter().map(|f| (f.key, f.clone())).collect(),
    )
}

/// What the engine asked of a [`Fake`] firewall, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Generation,
    Read,
    Commit(Vec<SetChange>, Option<u32>),
    Run(String),
    Close(Vec<(ForwardKey, Option<IpAddr>)>, u32),
}

/// A firewall in memory: one table, held as the kernel would dump it, that element batches
/// change as the kernel would (all or nothing, guarded by the generation), and a record of
/// every call. `nft` transactions are not interpreted: a rebuild leaves the table the test
/// says it builds.
pub struct Fake {
    pub table: Option<TableDump>,
    pub generation: u32,
    /// What the next rebuild leaves in the table.
    pub rebuilds_to: Option<TableDump>,
    /// Refuse this many of the next batches, as the kernel refuses an element it cannot
    /// take.
    pub refusals: usize,
    pub calls: Vec<Call>,
}

impl Fake {
    /// Holding the table `r` builds, as another run of the daemon left it.
    pub fn holding(r: &Ruleset) -> Fake {
        Fake {
            table: Some(counted(r.as_dump(1))),
            generation: 1,
            rebuilds_to: None,
            refusals: 0,
            calls: Vec::new(),
        }
    }

    /// Another program's commit: the generation moves, the table may change.
    pub fn outside(&mut self, change: impl FnOnce(&mut Option<TableDump>)) {
        change(&mut self.table);
        self.generation = self.generation.wrapping_add(1);
    }
}

/// The dump with the counters the kernel keeps on the address and bucket maps' elements:
/// some forwards carried flows, some did not.
fn counted(mut dump: TableDump) -> TableDump {
    for (set, elems) in &mut dump.elements {
        for elem in elems {
            elem.counter = counts(set, elem);
        }
    }
    dump
}

fn counts(set: &str, elem: &Elem) -> Option<(u64, u64)> {
    let counted = set.starts_with("fwd_") && set.ends_with("_addr") || set.starts_with("pick_");
    let packets = u64::from(elem.key.iter().map(|b| u32::from(*b)).sum::<u32>() % 3);
    counted.then_some((packets, 60 * packets))
}

fn refused(set: &str, errno: i32) -> KernelError {
    KernelError::Netlink(NetlinkError::Refused {
        set: set.to_owned(),
        source: std::io::Error::from_raw_os_error(errno),
    })
}

impl Firewall for Fake {
    fn generation(&mut self) -> Result<u32, KernelError> {
        self.calls.push(Call::Generation);
        Ok(self.generation)
    }

    fn read(&mut self, _table: &str, _sets: &[&str]) -> Result<Option<TableDump>, KernelError> {
        self.calls.push(Call::Read);
        Ok(self.table.clone().map(|dump| TableDump {
            generation: self.generation,
            ..dump
        }))
    }

    fn commit(
        &mut self,
        _table: &str,
        changes: &[SetChange],
        generation: Option<u32>,
    ) -> Result<Vec<(String, Elem)>, KernelError> {
        self.calls.push(Call::Commit(changes.to_vec(), generation));
        if let Some(generation) = generation
            && generation != self.generation
        {
            return Err(NetlinkError::Changed(generation).into());
        }
        let Some(table) = &self.table else {
            return Err(refused(changes.first().map_or("?", |c| c.set), ENOENT));
        };
        if self.refusals > 0 {
            self.refusals -= 1;
            return Err(refused(changes.first().map_or("?", |c| c.set), EEXIST));
        }
        let mut elements = table.elements.clone();
        let mut deleted = Vec::new();
        for change in changes {
            let Some(elems) = elements.get_mut(change.set) else {
                return Err(refused(change.set, ENOENT));
            };
            for elem in &change.elems {
                let at = elems
                    .iter()
                    .position(|e| e.key == elem.key && e.key_end == elem.key_end);
                match (change.op, at) {
                    (Op::Delete, Some(at)) => {
                        deleted.push((change.set.to_owned(), elems.remove(at)))
                    }
                    (Op::Delete, None) => return Err(refused(change.set, ENOENT)),
                    (Op::Add, Some(_)) => return Err(refused(change.set, EEXIST)),
                    (Op::Add, None) => elems.push(Elem {
                        counter: counts(change.set, elem),
                        ..elem.clone()
                    }),
                }
            }
        }
        self.table.as_mut().expect("checked above").elements = elements;
        self.generation = self.generation.wrapping_add(1);
        Ok(deleted)
    }

    fn run(&mut self, transaction: &str) -> Result<(), KernelError> {
        self.calls.push(Call::Run(transaction.to_owned()));
        self.table = Some(counted(
            self.rebuilds_to
                .clone()
                .expect("the test says what a rebuild builds"),
        ));
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    fn close_flows(
        &mut self,
        closing: &[(ForwardKey, Option<IpAddr>)],
        mark: u32,
    ) -> Result<usize, KernelError> {
        self.calls.push(Call::Close(closing.to_vec(), mark));
        Ok(closing.len())
    }
}

const ENOENT: i32 = 2;
const EEXIST: i32 = 17;
