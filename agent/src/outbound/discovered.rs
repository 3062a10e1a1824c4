//! The meshed destinations discovery says (DESIGN §6), swappable while
//! connections are being served.
//!
//! The discovery watcher builds a whole new [`DestinationTable`] per push and
//! [`replace`](DiscoveredDestinations::replace)s it; each outbound connection
//! takes one [`current`](DiscoveredDestinations::current) snapshot (a read
//! lock held for an `Arc` clone, the same pattern as the inbound
//! `SharedPolicy`) and looks up in it without further locking. Nothing ever
//! clears the table: when the operator is away the last one stays in force.

use std::fmt::Write as _;
use std::sync::Arc;

use parking_lot::RwLock;
use serde_json::{Value, json};

use super::destinations::DestinationTable;

/// One version of the discovered table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoveredTable {
    /// The operator's version of the table; `None` before the first push.
    pub version: Option<String>,
    pub table: DestinationTable,
    /// Entries of that push that were skipped (unparsable, another trust
    /// domain, a duplicate).
    pub skipped: usize,
}

/// Shared handle on the discovered table; clones share it.
#[derive(Clone, Debug, Default)]
pub struct DiscoveredDestinations(Arc<RwLock<Arc<DiscoveredTable>>>);

impl DiscoveredDestinations {
    pub fn new() -> Self {
        Self::default()
    }

    /// The table in force now; cheap (one `Arc` clone under a read lock).
    pub fn current(&self) -> Arc<DiscoveredTable> {
        self.0.read().clone()
    }

    /// Puts `table` in force for the next connections; returns the previous one.
    pub fn replace(&self, table: DiscoveredTable) -> Arc<DiscoveredTable> {
        std::mem::replace(&mut *self.0.write(), Arc::new(table))
    }

    /// The version in force, if any push arrived.
    pub fn version(&self) -> Option<String> {
        self.0.read().version.clone()
    }
}

/// Both sources of meshed destinations, for `/config_dump` and `/metrics`.
#[derive(Clone, Debug)]
pub struct DestinationSources {
    /// `--mesh-destination` flags; they win over discovery.
    pub flags: Arc<DestinationTable>,
    /// `None`: discovery is not configured.
    pub discovered: Option<DiscoveredDestinations>,
}

impl DestinationSources {
    /// `{"flags": [...], "discovery": {"version", "entries", "skipped"} | null}`,
    /// entries written as `--mesh-destination` values.
    pub fn to_json(&self) -> Value {
        let entries = |t: &DestinationTable| {
            t.entries()
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
        };
        let discovery = self.discovered.as_ref().map(|d| {
            let current = d.current();
            json!({
                "version": current.version,
                "entries": entries(&current.table),
                "skipped": current.skipped,
            })
        });
        json!({
            "flags": entries(&self.flags),
            "discovery": discovery,
        })
    }

    /// `palisade_agent_mesh_destinations{source="flag"|"discovery"}`.
    pub fn render_prometheus(&self, out: &mut String) {
        const NAME: &str = "palisade_agent_mesh_destinations";
        let _ = writeln!(
            out,
            "# HELP {NAME} Meshed destination entries the outbound proxy knows, by source (flags win over discovery)."
        );
        let _ = writeln!(out, "# TYPE {NAME} gauge");
        let _ = writeln!(out, "{NAME}{{source=\"flag\"}} {}", self.flags.len());
        let discovered = self
            .discovered
            .as_ref()
            .map_or(0, |d| d.current().table.len());
        let _ = writeln!(out, "{NAME}{{source=\"discovery\"}} {discovered}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

    #[test]
    fn replace_is_seen_by_the_next_snapshot_only() {
        let d = DiscoveredDestinations::new();
        let before = d.current();
        assert_eq!(before.version, None);
        let table = DestinationTable::parse([format!("10.0.0.5={ORDERS}").as_str()]).unwrap();
        d.clone().replace(DiscoveredTable {
            version: Some("v1".into()),
            table,
            skipped: 2,
        });
        // A snapshot taken earlier (an open connection's) is unchanged.
        assert!(before.table.is_empty());
        assert_eq!(d.version().as_deref(), Some("v1"));
        assert!(
            d.current()
                .table
                .lookup("10.0.0.5".parse().unwrap(), 80)
                .is_some()
        );

        let sources = DestinationSources {
            flags: Arc::new(DestinationTable::parse(["10.9.0.0/16=*", "10.8.0.1=*"]).unwrap()),
            discovered: Some(d),
        };
        let mut out = String::new();
        sources.render_prometheus(&mut out);
        assert!(out.contains("palisade_agent_mesh_destinations{source=\"flag\"} 2\n"));
        assert!(out.contains("palisade_agent_mesh_destinations{source=\"discovery\"} 1\n"));
        let json = sources.to_json();
        assert_eq!(json["discovery"]["version"], "v1");
        assert_eq!(json["discovery"]["skipped"], 2);
        assert_eq!(
            json["discovery"]["entries"][0],
            format!("10.0.0.5/32={ORDERS}")
        );
        assert_eq!(json["flags"].as_array().map(Vec::len), Some(2));
    }
}
