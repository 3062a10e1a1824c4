//! The operator's `MeshDestinations` as an outbound [`DestinationTable`].
//!
//! Not ACKed (the proto says so): an entry that cannot be used — not an
//! address or CIDR, a port beyond 65535, not a SPIFFE ID, an identity of
//! another trust domain (its certificate could never verify), a repeated
//! destination — is skipped with a warning, and the rest applies. Nothing the
//! operator sends can make this panic.

use palisade_proto::discovery::v1::MeshDestinations;

use crate::outbound::{DestinationEntry, DestinationTable, DiscoveredTable};

/// Builds the table of one push; skipped entries are logged and counted.
pub(crate) fn table_from_wire(wire: &MeshDestinations, trust_domain: &str) -> DiscoveredTable {
    let mut skipped = 0;
    let mut entries = Vec::with_capacity(wire.destinations.len());
    for d in &wire.destinations {
        let entry = match DestinationEntry::from_parts(&d.network, d.port, &d.spiffe_id) {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!(version = %wire.version, reason = %e,
                    "mesh destination from discovery skipped");
                skipped += 1;
                continue;
            }
        };
        if let Some(id) = entry.peer.pinned()
            && id.trust_domain() != trust_domain
        {
            tracing::warn!(version = %wire.version, %entry, trust_domain,
                "mesh destination from discovery skipped: identity of another trust domain");
            skipped += 1;
            continue;
        }
        entries.push(entry);
    }
    let (table, repeated) = DestinationTable::from_entries(entries);
    for entry in &repeated {
        tracing::warn!(version = %wire.version, %entry,
            "mesh destination from discovery skipped: a second entry for the same destination");
    }
    skipped += repeated.len();
    DiscoveredTable {
        version: Some(wire.version.clone()),
        table,
        skipped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_proto::discovery::v1::MeshDestination;

    use crate::outbound::ExpectedPeer;

    const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

    fn dest(network: &str, port: u32, id: &str) -> MeshDestination {
        MeshDestination {
            network: network.into(),
            port,
            spiffe_id: id.into(),
        }
    }

    #[test]
    fn garbage_is_skipped_and_the_rest_applies() {
        let wire = MeshDestinations {
            version: "h1".into(),
            destinations: vec![
                dest("10.0.0.5/32", 8443, ORDERS),
                dest("not-an-ip", 80, ORDERS),
                dest("10.0.0.6/33", 0, ORDERS),
                dest("10.0.0.7/32", 65536, ORDERS),
                dest("10.0.0.8/32", 0, "spiffe://evil.example/ns/shop/sa/orders"),
                dest("10.0.0.9/32", 0, "orders"),
                dest("10.0.0.5/32", 8443, "*"),
                dest("\u{0}\u{ffff}", u32::MAX, "\u{202e}*"),
                dest("fd00::1", 0, "*"),
            ],
        };
        let t = table_from_wire(&wire, "cluster.local");
        assert_eq!(t.version.as_deref(), Some("h1"));
        assert_eq!(t.skipped, 7);
        assert_eq!(t.table.len(), 2);
        let ip = |s: &str| s.parse().unwrap();
        assert_eq!(
            t.table
                .lookup(ip("10.0.0.5"), 8443)
                .map(ToString::to_string),
            Some(ORDERS.to_owned()),
            "the first of two entries for one destination stays"
        );
        assert_eq!(t.table.lookup(ip("10.0.0.5"), 80), None);
        assert_eq!(
            t.table.lookup(ip("10.0.0.8"), 80),
            None,
            "foreign trust domain"
        );
        assert_eq!(
            t.table.lookup(ip("fd00::1"), 1),
            Some(&ExpectedPeer::AnyInTrustDomain)
        );
    }

    mod pushes {
        //! Any push the operator (or something posing as it on a broken
        //! stream) could send: no panic, every entry either in the table or
        //! counted as skipped, and nothing of another trust domain pinned.
        use proptest::prelude::*;

        use super::*;

        fn network() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                (any::<[u8; 4]>(), 0u8..=40)
                    .prop_map(|(a, p)| { format!("{}/{p}", std::net::Ipv4Addr::from(a)) }),
                (any::<[u8; 16]>(), 0u8..=140)
                    .prop_map(|(a, p)| { format!("{}/{p}", std::net::Ipv6Addr::from(a)) }),
            ]
        }

        fn identity() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                Just("*".to_owned()),
                "spiffe://(cluster\\.local|evil\\.example)/ns/[a-z]{1,8}/sa/[a-z]{1,8}",
            ]
        }

        fn destination() -> impl Strategy<Value = MeshDestination> {
            (network(), prop_oneof![any::<u32>(), 0u32..4], identity()).prop_map(
                |(network, port, spiffe_id)| MeshDestination {
                    network,
                    port,
                    spiffe_id,
                },
            )
        }

        proptest! {
            #[test]
            fn every_entry_is_used_or_counted(
                version in any::<String>(),
                destinations in proptest::collection::vec(destination(), 0..40),
            ) {
                let wire = MeshDestinations { version: version.clone(), destinations };
                let t = table_from_wire(&wire, "cluster.local");
                prop_assert_eq!(t.version, Some(version));
                prop_assert_eq!(t.table.len() + t.skipped, wire.destinations.len());
                for entry in t.table.entries() {
                    if let Some(id) = entry.peer.pinned() {
                        prop_assert_eq!(id.trust_domain(), "cluster.local");
                    }
                    // What is in force is what a lookup of its own address finds
                    // (or a more specific entry for the same address).
                    let port = entry.port.unwrap_or(1);
                    let found = t.table.lookup_entry(entry.network.addr(), port);
                    prop_assert!(found.is_some_and(|f| f.network.prefix() >= entry.network.prefix()));
                }
            }
        }
    }

    #[test]
    fn an_empty_push_is_an_empty_table() {
        let t = table_from_wire(&MeshDestinations::default(), "cluster.local");
        assert!(t.table.is_empty());
        assert_eq!(t.skipped, 0);
        assert_eq!(t.version.as_deref(), Some(""));
    }
}
