//! The mesh destination table (DESIGN §6, outbound): every agent advertises
//! where it terminates mTLS for its workload (`WorkloadRef.endpoints`); the
//! operator merges those claims into one `MeshDestinations` table and pushes
//! it to every agent, so a client pins the server's SPIFFE ID when it
//! connects to a meshed address.
//!
//! Registrations live as long as the Watch stream that made them: the
//! [`Registration`] guard removes them when the session ends.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use palisade_proto::discovery::v1::{MeshDestination, MeshDestinations, MeshEndpoint};
use prost::Message as _;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// At most this many endpoints per subscriber: a pod has a handful of
/// addresses; more is a mistake or an attempt to bloat everyone's table.
pub use palisade_proto::discovery::limits::MAX_ENDPOINTS;

/// The identity entry meaning "any identity of the trust domain".
pub const ANY_IDENTITY: &str = "*";

/// An advertised endpoint that cannot be published.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    #[error("endpoints: at most {MAX_ENDPOINTS} are allowed, got {0}")]
    TooMany(usize),
    #[error("endpoints[{index}].ip: {ip:?} is not an IP address")]
    NotAnIp { index: usize, ip: String },
    #[error("endpoints[{index}].ip: {ip} is the unspecified address")]
    Unspecified { index: usize, ip: IpAddr },
    #[error("endpoints[{index}].ip: {ip} is a multicast or broadcast address")]
    NotUnicast { index: usize, ip: IpAddr },
    #[error("endpoints[{index}].port: {port} is not a port (0-65535, 0 = every port)")]
    BadPort { index: usize, port: u32 },
}

/// A validated endpoint. `port == 0` means every port of `ip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

/// Checks what an agent advertised. Loopback is allowed: in local mode
/// every agent runs on 127.0.0.1 with its own ports.
pub fn parse_endpoints(endpoints: &[MeshEndpoint]) -> Result<Vec<Endpoint>, EndpointError> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(EndpointError::TooMany(endpoints.len()));
    }
    endpoints
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let ip: IpAddr = e.ip.parse().map_err(|_| EndpointError::NotAnIp {
                index,
                ip: e.ip.clone(),
            })?;
            // "::ffff:10.0.0.5" and "10.0.0.5" are one destination.
            let ip = ip.to_canonical();
            if ip.is_unspecified() {
                return Err(EndpointError::Unspecified { index, ip });
            }
            let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
            if ip.is_multicast() || broadcast {
                return Err(EndpointError::NotUnicast { index, ip });
            }
            let port = u16::try_from(e.port).map_err(|_| EndpointError::BadPort {
                index,
                port: e.port,
            })?;
            Ok(Endpoint { ip, port })
        })
        .collect()
}

/// Registrations are keyed by identity and instance: the instance id is
/// chosen by the agent, so without the identity one workload could evict
/// another's endpoints by reusing its instance id.
type Key = (String, String);

struct Claim {
    /// Which stream registered it: a stale stream of the same instance
    /// ending late must not remove its successor's registration.
    generation: u64,
    endpoints: Vec<Endpoint>,
}

#[derive(Default)]
struct State {
    claims: BTreeMap<Key, Claim>,
    /// Conflicts already warned about, so every recomputation does not
    /// repeat the warning.
    conflicts: BTreeMap<Endpoint, BTreeSet<String>>,
}

/// Every agent's advertised endpoints and the table built from them.
/// Shared (`Arc`) by every Watch session.
pub struct MeshRegistry {
    state: Mutex<State>,
    next_generation: AtomicU64,
    table: watch::Sender<Arc<MeshDestinations>>,
}

impl Default for MeshRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MeshRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.table.borrow();
        f.debug_struct("MeshRegistry")
            .field("version", &table.version)
            .field("destinations", &table.destinations.len())
            .finish()
    }
}

impl MeshRegistry {
    pub fn new() -> Self {
        let (table, _) = watch::channel(Arc::new(build_table(
            &BTreeMap::new(),
            &mut BTreeMap::new(),
        )));
        Self {
            state: Mutex::new(State::default()),
            next_generation: AtomicU64::new(1),
            table,
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A panic while holding the lock leaves plain data behind; keep going.
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// Records what `instance` of `spiffe_id` advertises, replacing its
    /// previous registration. The claim is withdrawn when the returned
    /// guard is dropped (the Watch session ended).
    #[must_use = "dropping the registration withdraws the endpoints"]
    pub fn register(
        self: &Arc<Self>,
        spiffe_id: &str,
        instance: &str,
        endpoints: Vec<Endpoint>,
    ) -> Registration {
        let key = (spiffe_id.to_owned(), instance.to_owned());
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.with_state(|state| {
            state.claims.insert(
                key.clone(),
                Claim {
                    generation,
                    endpoints,
                },
            );
            self.publish(state);
        });
        Registration {
            registry: Arc::clone(self),
            key,
            generation,
        }
    }

    fn unregister(&self, key: &Key, generation: u64) {
        self.with_state(|state| {
            if state
                .claims
                .get(key)
                .is_some_and(|c| c.generation == generation)
            {
                state.claims.remove(key);
                self.publish(state);
            }
        });
    }

    /// Rebuilds the table; watchers hear about it only if the version moved.
    /// Called with the state locked, so tables are published in order.
    fn publish(&self, state: &mut State) {
        let table = build_table(&state.claims, &mut state.conflicts);
        self.table.send_if_modified(|current| {
            if current.version == table.version {
                return false;
            }
            tracing::info!(version = %table.version, destinations = table.destinations.len(),
                "mesh destination table updated");
            *current = Arc::new(table);
            true
        });
    }

    /// The current table.
    pub fn current(&self) -> Arc<MeshDestinations> {
        self.table.borrow().clone()
    }

    /// Follows the table; the current value counts as seen.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshDestinations>> {
        self.table.subscribe()
    }

    /// Entries in the current table.
    pub fn len(&self) -> usize {
        self.table.borrow().destinations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prometheus text (format 0.0.4), next to
    /// [`DiscoveryStatus::render_prometheus`](super::DiscoveryStatus::render_prometheus).
    pub fn render_prometheus(&self, out: &mut String) {
        let name = "palisade_operator_mesh_destinations";
        let _ = writeln!(
            out,
            "# HELP {name} Entries in the mesh destination table pushed to agents."
        );
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {}", self.len());
    }
}

/// Withdraws a registration when dropped.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<MeshRegistry>,
    key: Key,
    generation: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.unregister(&self.key, self.generation);
    }
}

/// One entry per distinct (ip, port), sorted by address then port. Several
/// instances of one identity collapse into one entry; different identities
/// on the same (ip, port) become `"*"`: we cannot tell which claim is true,
/// so the connection stays mTLS but is not pinned to either.
fn build_table(
    claims: &BTreeMap<Key, Claim>,
    warned: &mut BTreeMap<Endpoint, BTreeSet<String>>,
) -> MeshDestinations {
    let mut owners: BTreeMap<Endpoint, BTreeSet<&str>> = BTreeMap::new();
    for ((spiffe_id, _), claim) in claims {
        for endpoint in &claim.endpoints {
            owners.entry(*endpoint).or_default().insert(spiffe_id);
        }
    }
    let mut conflicts = BTreeMap::new();
    let destinations = owners
        .into_iter()
        .map(|(endpoint, ids)| {
            let spiffe_id = match ids.first() {
                Some(id) if ids.len() == 1 => (*id).to_owned(),
                _ => {
                    let ids: BTreeSet<String> = ids.iter().map(|s| (*s).to_owned()).collect();
                    if warned.get(&endpoint) != Some(&ids) {
                        tracing::warn!(ip = %endpoint.ip, port = endpoint.port,
                            identities = ?ids,
                            "several identities claim the same mesh endpoint; clients accept any identity of the trust domain there");
                    }
                    conflicts.insert(endpoint, ids);
                    ANY_IDENTITY.to_owned()
                }
            };
            let prefix = if endpoint.ip.is_ipv4() { 32 } else { 128 };
            MeshDestination {
                network: format!("{}/{prefix}", endpoint.ip),
                port: u32::from(endpoint.port),
                spiffe_id,
            }
        })
        .collect();
    *warned = conflicts;
    let mut table = MeshDestinations {
        version: String::new(),
        destinations,
    };
    // Same scheme as the policy version: a short hash of the content.
    let digest = Sha256::digest(table.encode_to_vec());
    table.version = hex::encode(&digest[..8]);
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    mod advertised {
        //! What any agent may advertise: accepted only as valid addresses,
        //! never a panic, never more than the limit.
        use proptest::prelude::*;

        use super::*;

        fn endpoint() -> impl Strategy<Value = MeshEndpoint> {
            (
                prop_oneof![
                    any::<String>(),
                    any::<[u8; 4]>().prop_map(|a| std::net::Ipv4Addr::from(a).to_string()),
                    any::<[u8; 16]>().prop_map(|a| std::net::Ipv6Addr::from(a).to_string()),
                ],
                prop_oneof![any::<u32>(), 0u32..=65535],
            )
                .prop_map(|(ip, port)| MeshEndpoint { ip, port })
        }

        proptest! {
            #[test]
            fn endpoints_parse_or_are_refused(
                endpoints in proptest::collection::vec(endpoint(), 0..20),
            ) {
                match parse_endpoints(&endpoints) {
                    Ok(parsed) => {
                        prop_assert!(endpoints.len() <= MAX_ENDPOINTS);
                        prop_assert_eq!(parsed.len(), endpoints.len());
                        for (p, wire) in parsed.iter().zip(&endpoints) {
                            prop_assert!(!p.ip.is_unspecified() && !p.ip.is_multicast());
                            prop_assert_eq!(u32::from(p.port), wire.port);
                        }
                    }
                    Err(e) => prop_assert!(e.to_string().contains("endpoints")),
                }
            }
        }
    }

    const A: &str = "spiffe://cluster.local/ns/shop/sa/orders";
    const B: &str = "spiffe://cluster.local/ns/shop/sa/payments";

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    fn rows(t: &MeshDestinations) -> Vec<(String, u32, String)> {
        t.destinations
            .iter()
            .map(|d| (d.network.clone(), d.port, d.spiffe_id.clone()))
            .collect()
    }

    fn row(network: &str, port: u32, id: &str) -> (String, u32, String) {
        (network.to_owned(), port, id.to_owned())
    }

    #[test]
    fn empty_table_has_a_version() {
        let r = Arc::new(MeshRegistry::new());
        assert!(r.is_empty());
        assert!(!r.current().version.is_empty());
    }

    #[test]
    fn different_identities_on_one_endpoint_become_any() {
        let r = Arc::new(MeshRegistry::new());
        let _a = r.register(A, "a1", vec![ep("10.0.0.5", 8080), ep("10.0.0.6", 0)]);
        let _b = r.register(B, "b1", vec![ep("10.0.0.5", 8080)]);
        assert_eq!(
            rows(&r.current()),
            vec![row("10.0.0.5/32", 8080, "*"), row("10.0.0.6/32", 0, A)]
        );
    }

    #[test]
    fn instances_of_one_identity_collapse_and_last_one_out_withdraws() {
        let r = Arc::new(MeshRegistry::new());
        let empty = r.current().version.clone();
        let a1 = r.register(A, "a1", vec![ep("10.0.0.5", 8080)]);
        let a2 = r.register(A, "a2", vec![ep("10.0.0.5", 8080)]);
        assert_eq!(rows(&r.current()), vec![row("10.0.0.5/32", 8080, A)]);
        drop(a1);
        assert_eq!(rows(&r.current()), vec![row("10.0.0.5/32", 8080, A)]);
        drop(a2);
        assert!(r.is_empty());
        assert_eq!(r.current().version, empty);
    }

    #[test]
    fn port_zero_and_a_specific_port_are_distinct_and_ordered() {
        let r = Arc::new(MeshRegistry::new());
        let _b = r.register(B, "b", vec![ep("fd00::1", 443), ep("10.0.0.9", 0)]);
        let _a = r.register(A, "a", vec![ep("10.0.0.9", 8080), ep("10.0.0.10", 1)]);
        assert_eq!(
            rows(&r.current()),
            vec![
                row("10.0.0.9/32", 0, B),
                row("10.0.0.9/32", 8080, A),
                row("10.0.0.10/32", 1, A),
                row("fd00::1/128", 443, B),
            ]
        );
    }

    #[test]
    fn version_depends_on_content_not_on_registration_order() {
        let one = Arc::new(MeshRegistry::new());
        let _x = one.register(A, "a", vec![ep("10.0.0.1", 1), ep("10.0.0.2", 2)]);
        let _y = one.register(B, "b", vec![ep("10.0.0.3", 3)]);
        let two = Arc::new(MeshRegistry::new());
        let _y2 = two.register(B, "other-instance", vec![ep("10.0.0.3", 3)]);
        let _x2 = two.register(A, "a", vec![ep("10.0.0.2", 2), ep("10.0.0.1", 1)]);
        assert_eq!(one.current(), two.current());
        // Any change of content changes the version.
        let _z = two.register(B, "more", vec![ep("10.0.0.4", 4)]);
        assert_ne!(one.current().version, two.current().version);
    }

    #[test]
    fn watchers_are_notified_only_when_the_version_changes() {
        let r = Arc::new(MeshRegistry::new());
        let mut rx = r.subscribe();
        let _none = r.register(A, "a1", vec![]);
        assert!(!rx.has_changed().unwrap());
        let a = r.register(A, "a2", vec![ep("10.0.0.5", 80)]);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // Same identity, same endpoint: same table.
        let _dup = r.register(A, "a3", vec![ep("10.0.0.5", 80)]);
        assert!(!rx.has_changed().unwrap());
        drop(a);
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn a_stale_stream_ending_late_keeps_its_successor() {
        let r = Arc::new(MeshRegistry::new());
        let old = r.register(A, "a1", vec![ep("10.0.0.5", 80)]);
        let _new = r.register(A, "a1", vec![ep("10.0.0.6", 80)]);
        // Re-registering replaces the old claim...
        assert_eq!(rows(&r.current()), vec![row("10.0.0.6/32", 80, A)]);
        // ...and the old guard no longer owns anything.
        drop(old);
        assert_eq!(rows(&r.current()), vec![row("10.0.0.6/32", 80, A)]);
    }

    #[test]
    fn another_identity_cannot_evict_by_reusing_an_instance_id() {
        let r = Arc::new(MeshRegistry::new());
        let _a = r.register(A, "same", vec![ep("10.0.0.5", 80)]);
        let b = r.register(B, "same", vec![]);
        drop(b);
        assert_eq!(rows(&r.current()), vec![row("10.0.0.5/32", 80, A)]);
    }

    #[test]
    fn renders_the_gauge() {
        let r = Arc::new(MeshRegistry::new());
        let _a = r.register(A, "a", vec![ep("10.0.0.5", 80), ep("10.0.0.5", 81)]);
        let mut out = String::new();
        r.render_prometheus(&mut out);
        assert!(
            out.contains("palisade_operator_mesh_destinations 2\n"),
            "{out}"
        );
        assert!(
            out.contains("# TYPE palisade_operator_mesh_destinations gauge\n"),
            "{out}"
        );
    }

    fn me(ip: &str, port: u32) -> MeshEndpoint {
        MeshEndpoint {
            ip: ip.to_owned(),
            port,
        }
    }

    #[test]
    fn validates_endpoints() {
        assert_eq!(
            parse_endpoints(&[me("127.0.0.1", 15006), me("::1", 0)]).unwrap(),
            vec![ep("127.0.0.1", 15006), ep("::1", 0)]
        );
        // The v4-mapped form is the IPv4 address.
        assert_eq!(
            parse_endpoints(&[me("::ffff:10.0.0.5", 80)]).unwrap(),
            vec![ep("10.0.0.5", 80)]
        );
        let err = |e: &[MeshEndpoint]| parse_endpoints(e).unwrap_err().to_string();
        assert_eq!(
            err(&[me("127.0.0.1", 1), me("x", 1)]),
            "endpoints[1].ip: \"x\" is not an IP address"
        );
        assert!(err(&[me("0.0.0.0", 1)]).starts_with("endpoints[0].ip:"));
        assert!(err(&[me("::", 1)]).starts_with("endpoints[0].ip:"));
        assert!(err(&[me("::ffff:0.0.0.0", 1)]).starts_with("endpoints[0].ip:"));
        assert!(err(&[me("224.0.0.1", 1)]).contains("multicast"));
        assert!(err(&[me("ff02::1", 1)]).contains("multicast"));
        assert!(err(&[me("255.255.255.255", 1)]).contains("broadcast"));
        assert!(err(&[me("fe80::1%eth0", 1)]).contains("not an IP address"));
        assert!(err(&[me("10.0.0.1", 70000)]).starts_with("endpoints[0].port: 70000"));
        let many = vec![me("10.0.0.1", 1); MAX_ENDPOINTS + 1];
        assert!(err(&many).starts_with("endpoints: at most 16"));
        assert_eq!(parse_endpoints(&many[..MAX_ENDPOINTS]).unwrap().len(), 16);
    }
}
