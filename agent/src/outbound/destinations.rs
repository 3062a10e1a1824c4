//! Which destinations are meshed, and whom the agent expects to find there.
//!
//! Each entry is `address[/prefix][:port] = <spiffe id | *>` (the
//! `--mesh-destination` flag). `*` means "any workload identity of our trust
//! domain": the server still has to present a certificate chaining to the
//! mesh bundle with a SPIFFE ID of the trust domain, only *which* one is not
//! pinned. A lookup by `(ip, port)` returns the most specific entry: the
//! longest prefix wins, and between equal prefixes an entry naming the port
//! beats one that does not (so `10.0.0.5:8443` beats `10.0.0.5`, which beats
//! `10.0.0.0/24:8443`, which beats `10.0.0.0/24`).
//!
//! Tables are small (a sidecar's flags, later discovery's answer), so entries
//! are kept sorted by specificity and scanned linearly: the first match is
//! the most specific one.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use palisade_policy::identity::{SpiffeId, SpiffeIdError};

/// Whom the server at a meshed destination must be.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExpectedPeer {
    /// Exactly this SPIFFE ID.
    Id(SpiffeId),
    /// Any workload identity of the mesh's trust domain (`*`).
    AnyInTrustDomain,
}

impl ExpectedPeer {
    /// The ID to pin in the verifier; `None` for `*` (the verifier still
    /// requires a SPIFFE ID of the trust domain).
    pub fn pinned(&self) -> Option<&SpiffeId> {
        match self {
            ExpectedPeer::Id(id) => Some(id),
            ExpectedPeer::AnyInTrustDomain => None,
        }
    }
}

impl fmt::Display for ExpectedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedPeer::Id(id) => write!(f, "{id}"),
            ExpectedPeer::AnyInTrustDomain => f.write_str("*"),
        }
    }
}

/// An IP network: an address with its host bits cleared and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpNetwork {
    addr: IpAddr,
    prefix: u8,
}

impl IpNetwork {
    /// `addr/prefix`, host bits cleared (as iptables and `ip route` do).
    /// `None` when the prefix is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let addr = addr.to_canonical();
        let addr = match addr {
            IpAddr::V4(a) => {
                if prefix > 32 {
                    return None;
                }
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix)))
            }
            IpAddr::V6(a) => {
                if prefix > 128 {
                    return None;
                }
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix)))
            }
        };
        Some(Self { addr, prefix })
    }

    /// A single host (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        let addr = addr.to_canonical();
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// Why a `--mesh-destination` entry was refused. Each variant quotes the part
/// that is wrong, so a typo in one of many flags is easy to find.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DestinationParseError {
    #[error("{0:?} is not ADDRESS[/PREFIX][:PORT]=<spiffe id | *>")]
    MissingEquals(String),
    #[error("{part:?} in {entry:?} is not an IP address")]
    Address { entry: String, part: String },
    #[error("{part:?} in {entry:?} is not a prefix length for that address")]
    Prefix { entry: String, part: String },
    #[error("{part:?} in {entry:?} is not a port (1-65535)")]
    Port { entry: String, part: String },
    #[error("{part:?} in {entry:?} is not a workload SPIFFE ID or `*`: {reason}")]
    Identity {
        entry: String,
        part: String,
        reason: SpiffeIdError,
    },
    #[error("{entry:?} repeats the destination of {previous:?}")]
    Duplicate { entry: String, previous: String },
}

/// One `address[/prefix][:port] = peer` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationEntry {
    pub network: IpNetwork,
    /// `None`: every port.
    pub port: Option<u16>,
    pub peer: ExpectedPeer,
}

impl DestinationEntry {
    /// Longer prefix first; at equal prefixes, a named port first.
    fn specificity(&self) -> (u8, bool) {
        (self.network.prefix, self.port.is_some())
    }

    fn matches(&self, ip: IpAddr, port: u16) -> bool {
        self.port.is_none_or(|p| p == port) && self.network.contains(ip)
    }
}

impl fmt::Display for DestinationEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.network.addr, self.port) {
            (IpAddr::V6(_), Some(port)) => write!(f, "[{}]:{port}", self.network)?,
            (_, Some(port)) => write!(f, "{}:{port}", self.network)?,
            (_, None) => write!(f, "{}", self.network)?,
        }
        write!(f, "={}", self.peer)
    }
}

impl FromStr for DestinationEntry {
    type Err = DestinationParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let entry = text.to_owned();
        let (dest, id) = text
            .split_once('=')
            .ok_or_else(|| DestinationParseError::MissingEquals(entry.clone()))?;
        let (dest, id) = (dest.trim(), id.trim());

        // `[v6(/p)]:port`, `v6(/p)` (two or more colons, no port), or
        // `v4(/p)(:port)`.
        let (net, port) = if let Some(rest) = dest.strip_prefix('[') {
            let (inner, after) =
                rest.split_once(']')
                    .ok_or_else(|| DestinationParseError::Address {
                        entry: entry.clone(),
                        part: dest.to_owned(),
                    })?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| DestinationParseError::Port {
                            entry: entry.clone(),
                            part: p.to_owned(),
                        })?,
                ),
            };
            (inner, port)
        } else if dest.matches(':').count() >= 2 {
            (dest, None)
        } else {
            match dest.rsplit_once(':') {
                Some((net, port)) => (net, Some(port)),
                None => (dest, None),
            }
        };

        let network = parse_network(&entry, net)?;
        let port = match port {
            None => None,
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                DestinationParseError::Port {
                    entry: entry.clone(),
                    part: p.to_owned(),
                }
            })?),
        };
        let peer = parse_peer(&entry, id)?;
        Ok(Self {
            network,
            port,
            peer,
        })
    }
}

impl DestinationEntry {
    /// An entry from its parts as discovery sends them (`MeshDestination`):
    /// `network` an address or CIDR, `port` 0 for every port, `spiffe_id` a
    /// workload SPIFFE ID or `*`. Whether the ID is of our trust domain is
    /// the caller's check, as for flags.
    pub fn from_parts(
        network: &str,
        port: u32,
        spiffe_id: &str,
    ) -> Result<Self, DestinationParseError> {
        let entry = format!("{network}:{port}={spiffe_id}");
        let network = parse_network(&entry, network.trim())?;
        let port = match port {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| DestinationParseError::Port {
                entry: entry.clone(),
                part: p.to_string(),
            })?),
        };
        let peer = parse_peer(&entry, spiffe_id.trim())?;
        Ok(Self {
            network,
            port,
            peer,
        })
    }
}

/// `addr[/prefix]`; `entry` is quoted in the error.
fn parse_network(entry: &str, net: &str) -> Result<IpNetwork, DestinationParseError> {
    let (addr_text, prefix_text) = match net.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (net, None),
    };
    let addr: IpAddr = addr_text
        .parse()
        .map_err(|_| DestinationParseError::Address {
            entry: entry.to_owned(),
            part: addr_text.to_owned(),
        })?;
    match prefix_text {
        None => Ok(IpNetwork::host(addr)),
        Some(p) => p
            .parse::<u8>()
            .ok()
            .and_then(|len| IpNetwork::new(addr, len))
            .ok_or_else(|| DestinationParseError::Prefix {
                entry: entry.to_owned(),
                part: p.to_owned(),
            }),
    }
}

/// A workload SPIFFE ID or `*`.
fn parse_peer(entry: &str, id: &str) -> Result<ExpectedPeer, DestinationParseError> {
    match id {
        "*" => Ok(ExpectedPeer::AnyInTrustDomain),
        id => SpiffeId::parse(id).map(ExpectedPeer::Id).map_err(|reason| {
            DestinationParseError::Identity {
                entry: entry.to_owned(),
                part: id.to_owned(),
                reason,
            }
        }),
    }
}

/// The meshed destinations, most specific first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestinationTable {
    entries: Vec<DestinationEntry>,
}

impl DestinationTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses every `--mesh-destination` value; the first bad one is the error.
    pub fn parse<'a>(
        specs: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, DestinationParseError> {
        let mut table = Self::new();
        for spec in specs {
            table.insert(spec.parse()?)?;
        }
        Ok(table)
    }

    /// Adds an entry; the same network and port twice is an error (which of
    /// two identities was meant cannot be guessed).
    pub fn insert(&mut self, entry: DestinationEntry) -> Result<(), DestinationParseError> {
        if let Some(previous) = self
            .entries
            .iter()
            .find(|e| e.network == entry.network && e.port == entry.port)
        {
            return Err(DestinationParseError::Duplicate {
                entry: entry.to_string(),
                previous: previous.to_string(),
            });
        }
        // Stable: keep insertion order among equally specific entries.
        let at = self
            .entries
            .iter()
            .position(|e| e.specificity() < entry.specificity())
            .unwrap_or(self.entries.len());
        self.entries.insert(at, entry);
        Ok(())
    }

    /// Builds a table from a whole set at once (a discovery push): the first
    /// of two entries for one network and port stays, the others are
    /// returned. One sort instead of [`insert`](Self::insert)'s scan per
    /// entry: a push of thousands of pods stays in the milliseconds.
    pub fn from_entries(
        entries: impl IntoIterator<Item = DestinationEntry>,
    ) -> (Self, Vec<DestinationEntry>) {
        let mut seen = HashSet::new();
        let (mut kept, mut repeated) = (Vec::new(), Vec::new());
        for entry in entries {
            if seen.insert((entry.network, entry.port)) {
                kept.push(entry);
            } else {
                repeated.push(entry);
            }
        }
        // Stable and descending: the same order `insert` keeps.
        kept.sort_by_key(|e| std::cmp::Reverse(e.specificity()));
        (Self { entries: kept }, repeated)
    }

    /// The most specific entry covering `ip:port`.
    pub fn lookup_entry(&self, ip: IpAddr, port: u16) -> Option<&DestinationEntry> {
        self.entries.iter().find(|e| e.matches(ip, port))
    }

    /// Whom the server at `ip:port` must be; `None`: not a meshed destination.
    pub fn lookup(&self, ip: IpAddr, port: u16) -> Option<&ExpectedPeer> {
        self.lookup_entry(ip, port).map(|e| &e.peer)
    }

    /// The entries, most specific first.
    pub fn entries(&self) -> &[DestinationEntry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
    const PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";
    const LEDGER: &str = "spiffe://cluster.local/ns/bank/sa/ledger";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn id(s: &str) -> ExpectedPeer {
        ExpectedPeer::Id(SpiffeId::parse(s).unwrap())
    }

    #[test]
    fn most_specific_entry_wins_whatever_the_order() {
        let specs = [
            "10.0.0.0/8=*".to_string(),
            format!("10.0.0.0/24={LEDGER}"),
            format!("10.0.0.0/24:8443={PAYMENTS}"),
            format!("10.0.0.5={ORDERS}"),
            format!("10.0.0.5:9090={LEDGER}"),
        ];
        // Every insertion order gives the same answers.
        for rotate in 0..specs.len() {
            let mut order = specs.clone();
            order.rotate_left(rotate);
            let t = DestinationTable::parse(order.iter().map(String::as_str)).unwrap();
            // exact ip:port over exact ip
            assert_eq!(t.lookup(ip("10.0.0.5"), 9090), Some(&id(LEDGER)));
            // exact ip (/32) over a /24 with the port
            assert_eq!(t.lookup(ip("10.0.0.5"), 8443), Some(&id(ORDERS)));
            assert_eq!(t.lookup(ip("10.0.0.5"), 80), Some(&id(ORDERS)));
            // /24 with port over /24 without
            assert_eq!(t.lookup(ip("10.0.0.6"), 8443), Some(&id(PAYMENTS)));
            assert_eq!(t.lookup(ip("10.0.0.6"), 80), Some(&id(LEDGER)));
            // /24 over /8
            assert_eq!(
                t.lookup(ip("10.0.1.6"), 8443),
                Some(&ExpectedPeer::AnyInTrustDomain)
            );
            // outside everything
            assert_eq!(t.lookup(ip("11.0.0.5"), 8443), None);
        }
    }

    #[test]
    fn cidr_boundaries_and_host_bits() {
        let t = DestinationTable::parse([format!("192.168.4.77/22={ORDERS}").as_str()]).unwrap();
        assert_eq!(t.entries()[0].network.to_string(), "192.168.4.0/22");
        assert!(t.lookup(ip("192.168.4.0"), 1).is_some());
        assert!(t.lookup(ip("192.168.7.255"), 1).is_some());
        assert!(t.lookup(ip("192.168.8.0"), 1).is_none());
        assert!(t.lookup(ip("192.168.3.255"), 1).is_none());
        // IPv4-mapped IPv6 (a dual-stack socket's view) matches the IPv4 entry.
        assert!(t.lookup(ip("::ffff:192.168.5.1"), 1).is_some());
    }

    #[test]
    fn port_restricted_entries_only_match_their_port() {
        let t = DestinationTable::parse([format!("10.1.2.3:8443={ORDERS}").as_str()]).unwrap();
        assert_eq!(t.lookup(ip("10.1.2.3"), 8443), Some(&id(ORDERS)));
        assert_eq!(t.lookup(ip("10.1.2.3"), 8080), None);
    }

    #[test]
    fn star_means_any_identity_and_pins_nothing() {
        let t = DestinationTable::parse(["0.0.0.0/0=*"]).unwrap();
        let peer = t.lookup(ip("203.0.113.9"), 443).unwrap();
        assert_eq!(peer, &ExpectedPeer::AnyInTrustDomain);
        assert_eq!(peer.pinned(), None);
        assert_eq!(t.lookup(ip("2001:db8::1"), 443), None, "v4 /0 is not v6");
    }

    #[test]
    fn ipv6_forms() {
        let t = DestinationTable::parse([
            format!("fd00::/64={ORDERS}").as_str(),
            format!("[fd00::7]:443={PAYMENTS}").as_str(),
            format!("[fd00:1::/48]:80={LEDGER}").as_str(),
            "fd00::9=*",
        ])
        .unwrap();
        assert_eq!(t.lookup(ip("fd00::7"), 443), Some(&id(PAYMENTS)));
        assert_eq!(t.lookup(ip("fd00::7"), 80), Some(&id(ORDERS)));
        assert_eq!(
            t.lookup(ip("fd00::9"), 80),
            Some(&ExpectedPeer::AnyInTrustDomain)
        );
        assert_eq!(t.lookup(ip("fd00:1:0:5::1"), 80), Some(&id(LEDGER)));
        assert_eq!(t.lookup(ip("fd00:1:0:5::1"), 81), None);
        assert_eq!(
            t.entries()[0].to_string(),
            format!("[fd00::7/128]:443={PAYMENTS}")
        );
    }

    #[test]
    fn parse_errors_name_the_bad_part() {
        let err = |s: &str| s.parse::<DestinationEntry>().unwrap_err();
        let msg = |s: &str| err(s).to_string();

        assert_eq!(
            err("10.0.0.1"),
            DestinationParseError::MissingEquals("10.0.0.1".into())
        );
        assert!(
            matches!(err("10.0.0.300=*"), DestinationParseError::Address { part, .. } if part == "10.0.0.300")
        );
        assert!(msg("10.0.0.300=*").contains("\"10.0.0.300\""));
        assert!(
            matches!(err("10.0.0.0/33=*"), DestinationParseError::Prefix { part, .. } if part == "33")
        );
        assert!(
            matches!(err("10.0.0.0/x:80=*"), DestinationParseError::Prefix { part, .. } if part == "x")
        );
        assert!(
            matches!(err("fd00::/129=*"), DestinationParseError::Prefix { part, .. } if part == "129")
        );
        assert!(
            matches!(err("10.0.0.1:99999=*"), DestinationParseError::Port { part, .. } if part == "99999")
        );
        assert!(
            matches!(err("10.0.0.1:0=*"), DestinationParseError::Port { part, .. } if part == "0")
        );
        assert!(
            matches!(err("[fd00::1]443=*"), DestinationParseError::Port { part, .. } if part == "443")
        );
        assert!(matches!(
            err("[fd00::1:443=*"),
            DestinationParseError::Address { .. }
        ));
        assert!(
            matches!(err("orders.shop:80=*"), DestinationParseError::Address { part, .. } if part == "orders.shop")
        );
        let e = err("10.0.0.1=spiffe://cluster.local/orders");
        assert!(
            matches!(&e, DestinationParseError::Identity { part, .. } if part == "spiffe://cluster.local/orders"),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("spiffe://cluster.local/orders"),
            "{e}"
        );
        assert!(matches!(
            err("10.0.0.1=**"),
            DestinationParseError::Identity { .. }
        ));

        let dup =
            DestinationTable::parse([format!("10.0.0.0/24={ORDERS}").as_str(), "10.0.0.9/24=*"])
                .unwrap_err();
        assert!(
            matches!(dup, DestinationParseError::Duplicate { .. }),
            "{dup:?}"
        );
        assert!(dup.to_string().contains("10.0.0.0/24"), "{dup}");
    }

    #[test]
    fn whitespace_around_the_parts_is_tolerated() {
        let e: DestinationEntry = format!(" 10.0.0.1:80 = {ORDERS} ").parse().unwrap();
        assert_eq!(e.port, Some(80));
        assert_eq!(e.peer, id(ORDERS));
    }

    #[test]
    fn a_whole_set_orders_like_one_insert_at_a_time() {
        let specs = [
            "10.0.0.0/8=*",
            "10.0.0.5:8443=spiffe://cluster.local/ns/shop/sa/orders",
            "10.0.0.0/24:8443=spiffe://cluster.local/ns/shop/sa/web",
            "10.0.0.5=spiffe://cluster.local/ns/shop/sa/payments",
            "10.0.0.0/24=*",
            "fd00::/64=*",
            "10.0.0.6:8443=spiffe://cluster.local/ns/shop/sa/orders",
        ];
        let entries: Vec<DestinationEntry> = specs.iter().map(|s| s.parse().unwrap()).collect();
        let one_by_one = DestinationTable::parse(specs).unwrap();
        let repeat: DestinationEntry = "10.0.0.5:8443=*".parse().unwrap();
        let (whole, repeated) =
            DestinationTable::from_entries(entries.into_iter().chain([repeat.clone()]));
        assert_eq!(whole, one_by_one);
        // The first entry for a destination stays; the second is handed back.
        assert_eq!(repeated, vec![repeat]);
        assert_eq!(
            whole.lookup(ip("10.0.0.5"), 8443),
            Some(&id("spiffe://cluster.local/ns/shop/sa/orders"))
        );
    }

    #[test]
    fn entries_from_discovery_parts() {
        let e = DestinationEntry::from_parts("10.0.0.5/32", 8443, ORDERS).unwrap();
        assert_eq!(e.network, IpNetwork::host(ip("10.0.0.5")));
        assert_eq!(e.port, Some(8443));
        assert_eq!(e.peer, id(ORDERS));
        // Port 0: every port; a bare address is a host; `*` any identity.
        let e = DestinationEntry::from_parts("fd00::7", 0, "*").unwrap();
        assert_eq!(e.network, IpNetwork::host(ip("fd00::7")));
        assert_eq!(e.port, None);
        assert_eq!(e.peer, ExpectedPeer::AnyInTrustDomain);
        // Host bits are cleared as for flags.
        let e = DestinationEntry::from_parts("10.1.2.3/16", 0, ORDERS).unwrap();
        assert_eq!(e.network.to_string(), "10.1.0.0/16");

        let err = |n: &str, p: u32, i: &str| DestinationEntry::from_parts(n, p, i).unwrap_err();
        assert!(matches!(
            err("", 80, ORDERS),
            DestinationParseError::Address { .. }
        ));
        assert!(matches!(
            err("orders.shop", 80, ORDERS),
            DestinationParseError::Address { .. }
        ));
        assert!(matches!(
            err("10.0.0.0/40", 80, ORDERS),
            DestinationParseError::Prefix { .. }
        ));
        assert!(
            matches!(err("10.0.0.5", 70000, ORDERS), DestinationParseError::Port { part, .. } if part == "70000")
        );
        assert!(matches!(
            err("10.0.0.5", 80, "spiffe://cluster.local/orders"),
            DestinationParseError::Identity { .. }
        ));
        assert!(matches!(
            err("10.0.0.5", 80, ""),
            DestinationParseError::Identity { .. }
        ));
    }
}
