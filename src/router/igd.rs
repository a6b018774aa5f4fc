//! A UPnP Internet Gateway Device client: SSDP discovery, the device description, and the
//! WANIPConnection actions the upstream lane needs (AddPortMapping, DeletePortMapping,
//! GetExternalIPAddress, GetStatusInfo, GetGenericPortMappingEntry).
//!
//! Written here rather than taken from a crate, for flash and for what the crates lack.
//! Measured on the release build: `igd-next` 0.18 (tokio flavour) costs 1,034,576 bytes
//! (it brings HTTP/2, `url` with its IDNA tables, two XML parsers and `rand`), cannot be given
//! a control URL without searching, and has no GetStatusInfo, whose uptime is how an IGD that
//! restarted (and forgot every mapping) is told from one that did not; `reqwest` alone (no
//! TLS, one POST, before any SSDP or XML) costs 383,240 bytes. HTTP goes through hyper's
//! client connection, already in the tree for the API server; the SOAP envelopes are fixed
//! text and their answers flat elements, read by [`element`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use tokio::net::{TcpStream, UdpSocket};

use crate::core::upstream::Mapping;

/// The SSDP multicast group and port.
const SSDP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(239, 255, 255, 250)), 1900);
/// Answers longer than this are refused: an IGD's description is a few kilobytes.
const MAX_BODY: usize = 256 * 1024;
/// The services that map ports, most capable first.
const SERVICES: [&str; 3] = [
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
];

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IgdError {
    /// No answer, or not one that HTTP or SOAP can read: the IGD may be gone.
    #[error("{0}")]
    Unreachable(String),
    /// The IGD answered with a UPnP error.
    #[error("{code} {reason}")]
    Refused { code: u16, reason: String },
}

fn unreachable(what: impl std::fmt::Display) -> IgdError {
    IgdError::Unreachable(what.to_string())
}

/// An `http://host:port/path` URL, all an IGD uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Url {
    pub fn parse(text: &str) -> Result<Url, String> {
        let rest = text
            .strip_prefix("http://")
            .ok_or_else(|| format!("\"{text}\": only http:// URLs name an IGD"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                let port = port
                    .parse()
                    .map_err(|_| format!("\"{text}\": the port is not a number"))?;
                (host, port)
            }
            _ => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("\"{text}\": no host"));
        }
        Ok(Url {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// `reference` read relative to this URL, as a description's `controlURL` is.
    pub fn join(&self, reference: &str) -> Result<Url, String> {
        if reference.starts_with("http://") {
            return Url::parse(reference);
        }
        let path = if reference.starts_with('/') {
            reference.to_owned()
        } else {
            let dir = &self.path[..self.path.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{reference}")
        };
        Ok(Url {
            path,
            ..self.clone()
        })
    }

    fn authority(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => format!("[{a}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.path)
    }
}

/// One request, one connection (IGDs close it after each answer anyway); returns the status
/// and the body.
async fn http(
    url: &Url,
    method: &str,
    headers: &[(&str, &str)],
    body: String,
    timeout: Duration,
) -> Result<(u16, String), IgdError> {
    let exchange = async {
        let stream = TcpStream::connect(url.authority())
            .await
            .map_err(|e| unreachable(format!("cannot connect to {url}: {e}")))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(format!("{url}: {e}")))?;
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(&url.path)
            .header("host", url.authority())
            .header("connection", "close");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(format!("{url}: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(format!("{url}: {e}")))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| unreachable(format!("{url}: reading the answer: {e}")))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer from {url} within {timeout:?}")))?
}

/// The text of the first `<name>…</name>` in `xml` (any namespace prefix), entities decoded.
/// UPnP answers are flat: this is all of XML they need.
pub fn element(xml: &str, name: &str) -> Option<String> {
    let mut rest = xml;
    loop {
        let start = rest.find('<')?;
        rest = &rest[start + 1..];
        let end = rest.find('>')?;
        let tag = &rest[..end];
        let local = tag.split_whitespace().next()?.rsplit(':').next()?;
        if local == name && !tag.starts_with('/') && !tag.ends_with('/') {
            let body = &rest[end + 1..];
            let close = body.find("</")?;
            return Some(decode(body[..close].trim()));
        }
        rest = &rest[end + 1..];
    }
}

fn decode(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The `<service>` blocks of a device description: (serviceType, controlURL).
fn services(xml: &str) -> Vec<(String, String)> {
    xml.split("<service>")
        .skip(1)
        .filter_map(|block| {
            let block = &block[..block.find("</service>")?];
            Some((
                element(block, "serviceType")?,
                element(block, "controlURL")?,
            ))
        })
        .collect()
}

/// A found IGD: where its port-mapping service is controlled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub control: Url,
    pub service: String,
    pub timeout: Duration,
}

/// One entry of the IGD's list of mappings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub mapping: Mapping,
    pub internal: String,
    pub description: String,
}

/// Asks the IGDs on the link of `local` (the router's WAN address) where their description
/// is; the first answer wins. The search goes to the SSDP group and, unicast, to each
/// default gateway: a router's firewall (OpenWrt's drops what enters from the WAN unless
/// it answers something sent) lets the gateway's answer to a unicast search in, not the
/// answer to a multicast one.
pub async fn discover(local: Ipv4Addr, timeout: Duration) -> Result<Url, IgdError> {
    let socket = UdpSocket::bind((local, 0))
        .await
        .map_err(|e| unreachable(format!("SSDP from {local}: {e}")))?;
    let _ = socket.set_multicast_ttl_v4(2);
    let gateways = std::fs::read_to_string("/proc/net/route")
        .map(|table| default_gateways(&table))
        .unwrap_or_default();
    let destinations = std::iter::once(SSDP).chain(
        gateways
            .into_iter()
            .map(|g| SocketAddr::new(IpAddr::V4(g), SSDP.port())),
    );
    for destination in destinations {
        for target in [
            "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
            "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
        ] {
            let search = format!(
                "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\nST: {target}\r\n\r\n"
            );
            // A gateway out of reach from this address is not an error: another may answer.
            if let Err(error) = socket.send_to(search.as_bytes(), destination).await {
                tracing::debug!(%error, %destination, "SSDP search not sent");
            }
        }
    }
    let wait = async {
        let mut buffer = vec![0; 2048];
        loop {
            let Ok((len, _)) = socket.recv_from(&mut buffer).await else {
                continue;
            };
            let answer = String::from_utf8_lossy(&buffer[..len]);
            let location = answer.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("location")
                    .then(|| value.trim().to_owned())
            });
            if let Some(url) = location.and_then(|l| Url::parse(&l).ok()) {
                return url;
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| {
        unreachable(format!(
            "no IGD answered an SSDP search from {local} within {timeout:?}"
        ))
    })
}

/// The IPv4 default gateways in `/proc/net/route` (addresses in the kernel's byte order).
fn default_gateways(table: &str) -> Vec<Ipv4Addr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (destination, gateway, mask) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
            if *destination != "00000000" || *mask != "00000000" {
                return None;
            }
            let raw = u32::from_str_radix(gateway, 16).ok()?;
            (raw != 0).then(|| Ipv4Addr::from(raw.to_ne_bytes()))
        })
        .collect()
}

impl Gateway {
    /// The gateway at `url`: a device description (as SSDP gives), or else its control URL.
    pub async fn at(url: &Url, timeout: Duration) -> Result<Gateway, IgdError> {
        let (status, body) = http(url, "GET", &[], String::new(), timeout).await?;
        if status == 200 && body.contains("<device") {
            let found = services(&body);
            let base = element(&body, "URLBase")
                .and_then(|b| Url::parse(&b).ok())
                .unwrap_or_else(|| url.clone());
            for wanted in SERVICES {
                if let Some((service, control)) = found.iter().find(|(s, _)| s == wanted) {
                    let control = base.join(control).map_err(unreachable)?;
                    return Ok(Gateway {
                        control,
                        service: service.clone(),
                        timeout,
                    });
                }
            }
            return Err(unreachable(format!(
                "{url} describes no WANIPConnection or WANPPPConnection service"
            )));
        }
        Ok(Gateway {
            control: url.clone(),
            service: SERVICES[1].to_owned(),
            timeout,
        })
    }

    /// The router's address toward the IGD: the one it maps to.
    pub fn local_address(&self) -> Result<Ipv4Addr, IgdError> {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .map_err(|e| unreachable(format!("route to {}: {e}", self.control)))?;
        socket
            .connect((self.control.host.as_str(), self.control.port))
            .map_err(|e| unreachable(format!("no route to {}: {e}", self.control)))?;
        match socket.local_addr() {
            Ok(SocketAddr::V4(local)) => Ok(*local.ip()),
            _ => Err(unreachable(format!(
                "no IPv4 address toward {}",
                self.control
            ))),
        }
    }

    /// Calls a SOAP action; returns the answer's body.
    async fn call(&self, action: &str, arguments: &[(&str, String)]) -> Result<String, IgdError> {
        let mut body = format!(
            "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><u:{action} xmlns:u=\"{}\">",
            self.service
        );
        for (name, value) in arguments {
            body.push_str(&format!("<{name}>{}</{name}>", escape(value)));
        }
        body.push_str(&format!("</u:{action}></s:Body></s:Envelope>\r\n"));
        let soap_action = format!("\"{}#{action}\"", self.service);
        let headers = [
            ("content-type", "text/xml; charset=\"utf-8\""),
            ("soapaction", soap_action.as_str()),
        ];
        let (status, answer) = http(&self.control, "POST", &headers, body, self.timeout).await?;
        if status == 200 {
            return Ok(answer);
        }
        match element(&answer, "errorCode").and_then(|c| c.parse().ok()) {
            Some(code) => Err(IgdError::Refused {
                code,
                reason: element(&answer, "errorDescription").unwrap_or_default(),
            }),
            None => Err(unreachable(format!(
                "{action} at {}: HTTP {status}",
                self.control
            ))),
        }
    }

    pub async fn external_address(&self) -> Result<Option<IpAddr>, IgdError> {
        let answer = self.call("GetExternalIPAddress", &[]).await?;
        Ok(element(&answer, "NewExternalIPAddress").and_then(|a| a.parse().ok()))
    }

    /// Seconds since the IGD's connection came up: when it goes back, the IGD restarted.
    pub async fn uptime(&self) -> Result<Option<u64>, IgdError> {
        let answer = self.call("GetStatusInfo", &[]).await?;
        Ok(element(&answer, "NewUptime").and_then(|u| u.parse().ok()))
    }

    pub async fn add(
        &self,
        mapping: Mapping,
        internal: Ipv4Addr,
        lease: u32,
        description: &str,
    ) -> Result<(), IgdError> {
        let port = mapping.port.to_string();
        self.call(
            "AddPortMapping",
            &[
                ("NewRemoteHost", String::new()),
                ("NewExternalPort", port.clone()),
                ("NewProtocol", mapping.igd_protocol().to_owned()),
                ("NewInternalPort", port),
                ("NewInternalClient", internal.to_string()),
                ("NewEnabled", "1".to_owned()),
                ("NewPortMappingDescription", description.to_owned()),
                ("NewLeaseDuration", lease.to_string()),
            ],
        )
        .await
        .map(drop)
    }

    pub async fn delete(&self, mapping: Mapping) -> Result<(), IgdError> {
        self.call(
            "DeletePortMapping",
            &[
                ("NewRemoteHost", String::new()),
                ("NewExternalPort", mapping.port.to_string()),
                ("NewProtocol", mapping.igd_protocol().to_owned()),
            ],
        )
        .await
        .map(drop)
    }

    /// The `index`th mapping of the IGD's list; `None` past its end (713).
    pub async fn entry(&self, index: u32) -> Result<Option<Entry>, IgdError> {
        let answer = match self
            .call(
                "GetGenericPortMappingEntry",
                &[("NewPortMappingIndex", index.to_string())],
            )
            .await
        {
            Ok(answer) => answer,
            Err(IgdError::Refused { code: 713, .. }) => return Ok(None),
            Err(error) => return Err(error),
        };
        let protocol = match element(&answer, "NewProtocol").as_deref() {
            Some("UDP") => crate::core::model::Protocol::Udp,
            _ => crate::core::model::Protocol::Tcp,
        };
        let port = element(&answer, "NewExternalPort")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        Ok(Some(Entry {
            mapping: Mapping { protocol, port },
            internal: element(&answer, "NewInternalClient").unwrap_or_default(),
            description: element(&answer, "NewPortMappingDescription").unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_and_joined() {
        let url = Url::parse("http://192.168.1.1:5000/rootDesc.xml").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("192.168.1.1", 5000, "/rootDesc.xml")
        );
        assert_eq!(
            url.join("/ctl/IPConn").unwrap().to_string(),
            "http://192.168.1.1:5000/ctl/IPConn"
        );
        assert_eq!(
            Url::parse("http://10.0.0.1/igd/desc.xml")
                .unwrap()
                .join("ctl")
                .unwrap()
                .to_string(),
            "http://10.0.0.1:80/igd/ctl"
        );
        assert_eq!(
            Url::parse("http://[fe80::1]:49000/x").unwrap().host,
            "fe80::1"
        );
        assert!(Url::parse("https://box/").is_err());
        assert!(Url::parse("http://box:port/").is_err());
    }

    #[test]
    fn the_port_mapping_service_is_found_in_a_description() {
        // Shaped as miniupnpd 2.3's rootDesc.xml, shortened.
        let description = "<?xml version=\"1.0\"?><root xmlns=\"urn:schemas-upnp-org:device-1-0\"><device><serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType><controlURL>/ctl/L3F</controlURL></service></serviceList><deviceList><device><deviceList><device><serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType><serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><controlURL>/ctl/IPConn</controlURL></service></serviceList></device></deviceList></device></deviceList></device></root>";
        let found = services(description);
        assert_eq!(found.len(), 2);
        assert_eq!(
            found[1],
            (
                "urn:schemas-upnp-org:service:WANIPConnection:2".to_owned(),
                "/ctl/IPConn".to_owned()
            )
        );
    }

    #[test]
    fn default_gateways_are_read_from_the_route_table() {
        let raw = u32::from_ne_bytes([192, 168, 1, 1]);
        let table = format!(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             wan\t00000000\t{raw:08X}\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
             wan\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        );
        assert_eq!(default_gateways(&table), [Ipv4Addr::new(192, 168, 1, 1)]);
    }

    #[test]
    fn soap_answers_and_faults_are_read() {
        let answer = "<s:Envelope><s:Body><u:GetExternalIPAddressResponse xmlns:u=\"urn:x\"><NewExternalIPAddress>198.51.100.7</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>";
        assert_eq!(
            element(answer, "NewExternalIPAddress").as_deref(),
            Some("198.51.100.7")
        );
        let fault = "<s:Fault><detail><UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>718</errorCode><errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail></s:Fault>";
        assert_eq!(element(fault, "errorCode").as_deref(), Some("718"));
        assert_eq!(element("<a>x &amp; y</a>", "a").as_deref(), Some("x & y"));
        assert_eq!(element("<a/><a>1</a>", "a").as_deref(), Some("1"));
        assert_eq!(element("<b>1</b>", "a"), None);
    }
}
