//! The real kernel behind the engine's [`Firewall`] trait, recording and timing what is sent:
//! the kernel tests check what went out, the kernel bench times each part.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use kube_port_forward::core::model::ForwardKey;
use kube_port_forward::kernel::wire::{Elem, SetChange};
use kube_port_forward::kernel::{Firewall, Kernel, KernelError, NftCli, TableDump};

pub struct Recording {
    pub inner: Kernel,
    /// nft transactions run.
    pub runs: Vec<String>,
    /// Netlink batches committed, and how long each took.
    pub commits: Vec<Vec<SetChange>>,
    pub commit_times: Vec<Duration>,
    /// The forwards whose flows were asked closed, call by call, and how long each took.
    pub closings: Vec<Vec<(ForwardKey, Option<IpAddr>)>>,
    pub closing_times: Vec<Duration>,
    /// Applied to every table read, to make the kernel seem to hold something else.
    pub tamper: Option<fn(&mut TableDump)>,
    /// Run right after each nft transaction, as another program would.
    pub after_run: Option<fn()>,
}

impl Default for Recording {
    fn default() -> Recording {
        Recording {
            inner: Kernel::new(NftCli::default()),
            runs: Vec::new(),
            commits: Vec::new(),
            commit_times: Vec::new(),
            closings: Vec::new(),
            closing_times: Vec::new(),
            tamper: None,
            after_run: None,
        }
    }
}

impl Firewall for Recording {
    fn generation(&mut self) -> Result<u32, KernelError> {
        self.inner.generation()
    }

    fn read(&mut self, table: &str, sets: &[&str]) -> Result<Option<TableDump>, KernelError> {
        let mut dump = self.inner.read(table, sets)?;
        if let (Some(tamper), Some(dump)) = (self.tamper, dump.as_mut()) {
            tamper(dump);
        }
        Ok(dump)
    }

    fn commit(
        &mut self,
        table: &str,
        changes: &[SetChange],
        generation: Option<u32>,
    ) -> Result<Vec<(String, Elem)>, KernelError> {
        self.commits.push(changes.to_vec());
        let start = Instant::now();
        let result = self.inner.commit(table, changes, generation);
        self.commit_times.push(start.elapsed());
        result
    }

    fn run(&mut self, transaction: &str) -> Result<(), KernelError> {
        self.runs.push(transaction.to_owned());
        let result = self.inner.run(transaction);
        if let Some(after_run) = self.after_run {
            after_run();
        }
        result
    }

    fn close_flows(
        &mut self,
        keys: &[(ForwardKey, Option<IpAddr>)],
        mark: u32,
    ) -> Result<usize, KernelError> {
        self.closings.push(keys.to_vec());
        let start = Instant::now();
        let result = self.inner.close_flows(keys, mark);
        self.closing_times.push(start.elapsed());
        result
    }
}
