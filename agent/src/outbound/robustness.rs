//! Property-based robustness tests of what the outbound side parses
//! (DESIGN §6: each step has its tests and a fuzz target beside it; on the
//! stable toolchain the fuzz target is a proptest).
//!
//! - [`super::detect::classify`]: the app's first bytes; never panics, never
//!   changes its mind as more bytes arrive, never calls a prefix of a request
//!   line or of the h2 preface something else.
//! - [`super::destinations::DestinationEntry`] (`--mesh-destination`) and,
//!   as the other address-and-path flag, [`crate::admin::app_probe::AppProbe`]
//!   (`--app-probe`): any text parses or is refused without panicking, and
//!   what parses prints back to the same value.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use palisade_policy::identity::SpiffeId;
use proptest::prelude::*;
use proptest::sample::select;

use super::destinations::{DestinationEntry, ExpectedPeer, IpNetwork};
use super::detect::{Alpn, Sniffed, classify};
use crate::admin::app_probe::AppProbe;

const H2: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn request_line() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            select(vec![
                "GET", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "M-SEARCH", "PRI"
            ])
            .prop_map(str::to_owned),
            // Upper-case methods up to the longest accepted (20).
            "[A-Z_-]{1,20}",
        ],
        prop_oneof![
            "/[!-~]{0,60}",
            Just("*".to_owned()),
            "[a-z.]{1,20}:[0-9]{1,5}"
        ],
        0..10u8,
        select(vec!["\r\n", "\n", "\r"]),
    )
        .prop_map(|(m, t, d, eol)| format!("{m} {t} HTTP/1.{d}{eol}").into_bytes())
}

fn first_bytes() -> impl Strategy<Value = Vec<u8>> {
    let tail = proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        (request_line(), tail.clone()).prop_map(|(a, b)| [a, b].concat()),
        (0..=H2.len(), tail.clone()).prop_map(|(n, t)| [&H2[..n], &t].concat()),
        (0u8..4, tail).prop_map(|(v, t)| [&[0x16, 0x03, v][..], &t].concat()),
    ]
}

fn spiffe_text() -> impl Strategy<Value = String> {
    ("[a-z0-9._-]{1,20}", "[a-z0-9.-]{1,20}", "[a-z0-9.-]{1,20}")
        .prop_map(|(td, ns, sa)| format!("spiffe://{td}/ns/{ns}/sa/{sa}"))
}

/// An address that stays what it is (not an IPv4-mapped IPv6 address, which
/// the table folds into IPv4 on purpose).
fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<Ipv4Addr>().prop_map(IpAddr::V4),
        any::<Ipv6Addr>()
            .prop_filter("mapped", |a| a.to_ipv4_mapped().is_none())
            .prop_map(IpAddr::V6),
    ]
}

/// Text shaped like a `--mesh-destination` entry, often slightly wrong.
fn destination_text() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            ip().prop_map(|a| a.to_string()),
            "[0-9a-f:.]{0,20}",
            any::<String>(),
        ],
        proptest::option::of(prop_oneof![
            (0u8..=140).prop_map(|p| p.to_string()),
            "[0-9x-]{0,4}"
        ]),
        proptest::option::of(prop_oneof![
            any::<u16>().prop_map(|p| p.to_string()),
            "[0-9]{0,7}"
        ]),
        any::<bool>(),
        prop_oneof![
            spiffe_text(),
            Just("*".to_owned()),
            any::<String>(),
            Just(String::new())
        ],
        select(vec!["=", " = ", "==", ""]),
    )
        .prop_map(|(addr, prefix, port, brackets, id, eq)| {
            let mut net = addr;
            if let Some(p) = prefix {
                net = format!("{net}/{p}");
            }
            if brackets {
                net = format!("[{net}]");
            }
            if let Some(port) = port {
                net = format!("{net}:{port}");
            }
            format!("{net}{eq}{id}")
        })
}

/// Text shaped like an `--app-probe` value, often slightly wrong.
fn probe_text() -> impl Strategy<Value = String> {
    (
        prop_oneof!["[A-Za-z0-9._-]{1,12}", any::<String>()],
        prop_oneof![
            (ip(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(a, p).to_string()),
            any::<String>(),
        ],
        prop_oneof!["", "/[!-~]{0,40}", "/[ -~]{0,20}", "[/?#%]{0,4}"],
        select(vec!["=", "==", ""]),
    )
        .prop_map(|(n, a, p, eq)| format!("{n}{eq}{a}{p}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any first bytes: no panic, and a decision, once taken on a prefix,
    /// stands for every longer input (`detect_alpn` re-peeks a growing
    /// buffer).
    #[test]
    fn alpn_classify_is_total_and_monotonic(input in first_bytes()) {
        let mut decided = None;
        for n in 0..=input.len() {
            match (classify(&input[..n]), decided) {
                (Sniffed::Decided(a), None) => decided = Some(a),
                (Sniffed::Decided(a), Some(d)) => prop_assert_eq!(a, d, "prefix {}", n),
                (Sniffed::NeedMore, Some(d)) => {
                    prop_assert!(false, "decided {:?} then undecided at {}", d, n)
                }
                (Sniffed::NeedMore, None) => {}
            }
        }
    }

    /// Prefixes of a request line: "need more" or `http/1.1`; the whole
    /// line (up to the end of the version) `http/1.1`. Prefixes of the h2
    /// preface: "need more" or `h2`.
    #[test]
    fn alpn_prefixes_are_never_misclassified(line in request_line()) {
        for n in 0..=line.len() {
            let c = classify(&line[..n]);
            prop_assert!(
                matches!(c, Sniffed::NeedMore | Sniffed::Decided(Alpn::Http11)),
                "{:?} for {:?}", c, String::from_utf8_lossy(&line[..n])
            );
        }
        prop_assert_eq!(classify(&line), Sniffed::Decided(Alpn::Http11));
        for n in 0..=H2.len() {
            let c = classify(&H2[..n]);
            prop_assert!(matches!(c, Sniffed::NeedMore | Sniffed::Decided(Alpn::H2)), "{}", n);
        }
        prop_assert_eq!(classify(H2), Sniffed::Decided(Alpn::H2));
    }

    /// Any text as a `--mesh-destination`: parsed or refused; parsed
    /// entries print to text that parses to the same entry.
    #[test]
    fn destination_entries_round_trip_through_display(
        text in prop_oneof![any::<String>(), destination_text()],
    ) {
        if let Ok(entry) = text.parse::<DestinationEntry>() {
            let printed = entry.to_string();
            prop_assert_eq!(printed.parse::<DestinationEntry>(), Ok(entry.clone()), "{}", printed);
            prop_assert_eq!(entry.port == Some(0), false);
        }
    }

    /// Entries built from their parts parse to exactly those parts.
    #[test]
    fn destination_entries_from_parts(
        addr in ip(),
        prefix in proptest::option::of(0u8..=128),
        port in proptest::option::of(1u16..),
        id in proptest::option::of(spiffe_text()),
    ) {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let network = match prefix {
            Some(p) if p > max => return Ok(()),
            Some(p) => IpNetwork::new(addr, p).unwrap(),
            None => IpNetwork::host(addr),
        };
        let dest = match prefix {
            Some(p) => format!("{addr}/{p}"),
            None => addr.to_string(),
        };
        let dest = match (port, addr) {
            (Some(port), IpAddr::V6(_)) => format!("[{dest}]:{port}"),
            (Some(port), IpAddr::V4(_)) => format!("{dest}:{port}"),
            (None, _) => dest,
        };
        let peer = match &id {
            Some(id) => ExpectedPeer::Id(SpiffeId::parse(id).unwrap()),
            None => ExpectedPeer::AnyInTrustDomain,
        };
        let text = format!("{dest}={}", id.as_deref().unwrap_or("*"));
        let entry: DestinationEntry = text.parse().unwrap();
        prop_assert_eq!(entry, DestinationEntry { network, port, peer });
        prop_assert!(network.contains(addr));
    }

    /// Any text as an `--app-probe`: parsed or refused; a parsed probe,
    /// written back as `NAME=ADDR PATH`, parses to the same probe.
    #[test]
    fn app_probe_round_trips(text in prop_oneof![any::<String>(), probe_text()]) {
        if let Ok(p) = text.parse::<AppProbe>() {
            prop_assert!(p.path.starts_with('/'));
            let printed = format!("{}={}{}", p.name, p.addr, p.path);
            prop_assert_eq!(printed.parse::<AppProbe>(), Ok(p));
        }
    }
}
