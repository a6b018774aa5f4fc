//! Forwards and rulesets for the kernel lane's unit tests.

use std::net::IpAddr;

use super::{DEFAULT_TABLE, Ruleset, TableConfig};
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
