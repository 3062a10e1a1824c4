//! The pure rule planner: a [`CaptureConfig`] in, the `iptables -t nat`
//! commands out. Nothing here runs a process, so the exact command lists are
//! unit-tested.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Chain PREROUTING jumps to: decides which inbound TCP is captured.
pub const INBOUND_CHAIN: &str = "PALISADE_INBOUND";
/// Chain that redirects inbound TCP to the agent's inbound port.
pub const REDIRECT_IN_CHAIN: &str = "PALISADE_REDIRECT_IN";
/// Chain OUTPUT jumps to: decides which outbound TCP is captured.
pub const OUTPUT_CHAIN: &str = "PALISADE_OUTPUT";
/// Chain that redirects outbound TCP to the agent's outbound port.
pub const REDIRECT_OUT_CHAIN: &str = "PALISADE_REDIRECT_OUT";

/// Every chain this module owns, in creation order.
pub const CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    REDIRECT_IN_CHAIN,
    OUTPUT_CHAIN,
    REDIRECT_OUT_CHAIN,
];

/// The table every rule lives in.
pub const TABLE: &str = "nat";

/// What to capture (DESIGN §6 ports and proxy UID by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Where inbound TCP is redirected (the agent's inbound listener).
    pub inbound_port: u16,
    /// Where outbound TCP is redirected (the agent's outbound listener).
    pub outbound_port: u16,
    /// UID the agent runs as; its own traffic is never captured.
    pub proxy_uid: u32,
    /// The agent's admin port; never captured inbound.
    pub admin_port: u16,
    /// Inbound destination ports left alone.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations left alone.
    pub exclude_outbound_cidrs: Vec<Ipv4Cidr>,
    /// Inbound ports captured: `None` = every port (minus exclusions).
    pub include_inbound_ports: Option<Vec<u16>>,
    /// The pod's IP: the app's connections to itself through it (over `lo`)
    /// are captured; without it all `lo` traffic is left alone.
    pub pod_ip: Option<Ipv4Addr>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            inbound_port: 15006,
            outbound_port: 15001,
            proxy_uid: 2137,
            admin_port: 15020,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            include_inbound_ports: None,
            pod_ip: None,
        }
    }
}

/// An IPv4 network in CIDR notation, normalised to its network address (as
/// `iptables-save` prints it). A bare address means `/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// The network `addr/prefix`, host bits cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, String> {
        if prefix > 32 {
            return Err(format!("prefix length {prefix} is over 32"));
        }
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a,
                p.parse::<u8>()
                    .map_err(|_| format!("{s:?}: bad prefix length"))?,
            ),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 CIDR (a.b.c.d/len)"))?;
        Self::new(addr, prefix).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One step of installing or removing the rules. Every step is one
/// `iptables -t nat ARGS` invocation (plus a check for the conditional ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Run; any failure is fatal.
    Run(Vec<String>),
    /// `-N CHAIN`; "already exists" is fine.
    CreateChain(String),
    /// `-X CHAIN`; "no such chain" is fine.
    DeleteChain(String),
    /// `-F CHAIN`; "no such chain" is fine (cleanup only).
    FlushIfExists(String),
    /// `-A` this rule only if `-C` says it is absent.
    AppendIfAbsent(Vec<String>),
    /// `-D` this rule for as long as `-C` says it is present.
    DeleteWhilePresent(Vec<String>),
}

impl Step {
    /// The arguments after `iptables -t nat` of the command this step runs
    /// (the conditional ones: of the command run when the check says so).
    pub fn args(&self) -> Vec<String> {
        match self {
            Step::Run(args) => args.clone(),
            Step::CreateChain(c) => strings(&["-N", c]),
            Step::DeleteChain(c) => strings(&["-X", c]),
            Step::FlushIfExists(c) => strings(&["-F", c]),
            Step::AppendIfAbsent(rule) => with_op("-A", rule),
            Step::DeleteWhilePresent(rule) => with_op("-D", rule),
        }
    }
}

impl fmt::Display for Step {
    /// A shell rendering for `--dry-run` (the agent itself never uses a shell).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cmd = |args: &[String]| format!("iptables -t {TABLE} {}", args.join(" "));
        match self {
            Step::Run(args) => write!(f, "{}", cmd(args)),
            Step::CreateChain(_) => write!(f, "{}  # ok if it exists", cmd(&self.args())),
            Step::DeleteChain(_) | Step::FlushIfExists(_) => {
                write!(f, "{}  # ok if it is missing", cmd(&self.args()))
            }
            Step::AppendIfAbsent(rule) => {
                write!(f, "{} || {}", cmd(&with_op("-C", rule)), cmd(&self.args()))
            }
            Step::DeleteWhilePresent(rule) => write!(
                f,
                "while {}; do {}; done",
                cmd(&with_op("-C", rule)),
                cmd(&self.args())
            ),
        }
    }
}

fn strings(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn with_op(op: &str, rule: &[String]) -> Vec<String> {
    let mut args = vec![op.to_string()];
    args.extend(rule.iter().cloned());
    args
}

/// `CHAIN -p tcp MATCHES... -j TARGET [TARGET-ARGS]`, without the `-A`.
fn rule(chain: &str, matches: &[&str], target: &[&str]) -> Vec<String> {
    let mut r = strings(&[chain, "-p", "tcp"]);
    r.extend(strings(matches));
    r.push("-j".into());
    r.extend(strings(target));
    r
}

fn dedup(ports: impl IntoIterator<Item = u16>) -> Vec<u16> {
    let mut out = Vec::new();
    for p in ports {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The jump from PREROUTING into [`INBOUND_CHAIN`] (no `-A`/`-C`/`-D`).
pub fn prerouting_jump() -> Vec<String> {
    rule("PREROUTING", &[], &[INBOUND_CHAIN])
}

/// The jump from OUTPUT into [`OUTPUT_CHAIN`] (no `-A`/`-C`/`-D`).
pub fn output_jump() -> Vec<String> {
    rule("OUTPUT", &[], &[OUTPUT_CHAIN])
}

/// The rules of our four chains, in order, each as `CHAIN ARGS...` (no `-A`).
pub fn chain_rules(config: &CaptureConfig) -> Vec<Vec<String>> {
    let mut rules = Vec::new();
    let inbound = config.inbound_port.to_string();
    let outbound = config.outbound_port.to_string();

    // Redirect chains: one REDIRECT each.
    rules.push(rule(
        REDIRECT_IN_CHAIN,
        &[],
        &["REDIRECT", "--to-ports", &inbound],
    ));
    rules.push(rule(
        REDIRECT_OUT_CHAIN,
        &[],
        &["REDIRECT", "--to-ports", &outbound],
    ));

    // Inbound: never the agent's own ports or the admin port, nor excluded ports.
    let skipped = dedup(
        [config.inbound_port, config.outbound_port, config.admin_port]
            .into_iter()
            .chain(config.exclude_inbound_ports.iter().copied()),
    );
    match &config.include_inbound_ports {
        None => {
            for port in &skipped {
                let port = port.to_string();
                rules.push(rule(INBOUND_CHAIN, &["--dport", &port], &["RETURN"]));
            }
            rules.push(rule(INBOUND_CHAIN, &[], &[REDIRECT_IN_CHAIN]));
        }
        Some(included) => {
            // Only the listed ports jump; everything else falls off the chain.
            for port in dedup(included.iter().copied()) {
                if skipped.contains(&port) {
                    continue;
                }
                let port = port.to_string();
                rules.push(rule(
                    INBOUND_CHAIN,
                    &["--dport", &port],
                    &[REDIRECT_IN_CHAIN],
                ));
            }
        }
    }

    // Outbound: the agent's own traffic, loopback, excluded CIDRs and ports stay.
    let uid = config.proxy_uid.to_string();
    rules.push(rule(
        OUTPUT_CHAIN,
        &["-m", "owner", "--uid-owner", &uid],
        &["RETURN"],
    ));
    rules.push(rule(OUTPUT_CHAIN, &["-d", "127.0.0.1/32"], &["RETURN"]));
    match config.pod_ip {
        Some(ip) => {
            let pod = format!("{ip}/32");
            rules.push(rule(
                OUTPUT_CHAIN,
                &["!", "-d", &pod, "-o", "lo"],
                &["RETURN"],
            ));
        }
        None => rules.push(rule(OUTPUT_CHAIN, &["-o", "lo"], &["RETURN"])),
    }
    let mut cidrs: Vec<Ipv4Cidr> = Vec::new();
    for c in &config.exclude_outbound_cidrs {
        if !cidrs.contains(c) {
            cidrs.push(*c);
        }
    }
    for cidr in cidrs {
        let cidr = cidr.to_string();
        rules.push(rule(OUTPUT_CHAIN, &["-d", &cidr], &["RETURN"]));
    }
    for port in dedup(config.exclude_outbound_ports.iter().copied()) {
        let port = port.to_string();
        rules.push(rule(OUTPUT_CHAIN, &["--dport", &port], &["RETURN"]));
    }
    rules.push(rule(OUTPUT_CHAIN, &[], &[REDIRECT_OUT_CHAIN]));
    rules
}

/// Install (idempotently): create our chains if missing, flush them, re-add
/// every rule, then add the PREROUTING/OUTPUT jumps only if absent.
pub fn install_plan(config: &CaptureConfig) -> Vec<Step> {
    let mut steps: Vec<Step> = CHAINS
        .iter()
        .map(|c| Step::CreateChain(c.to_string()))
        .collect();
    steps.extend(CHAINS.iter().map(|c| Step::Run(strings(&["-F", c]))));
    steps.extend(
        chain_rules(config)
            .into_iter()
            .map(|r| Step::Run(with_op("-A", &r))),
    );
    steps.push(Step::AppendIfAbsent(prerouting_jump()));
    steps.push(Step::AppendIfAbsent(output_jump()));
    steps
}

/// Remove everything [`install_plan`] adds; safe to run when nothing is installed.
pub fn cleanup_plan() -> Vec<Step> {
    let mut steps = vec![
        Step::DeleteWhilePresent(prerouting_jump()),
        Step::DeleteWhilePresent(output_jump()),
    ];
    steps.extend(CHAINS.iter().map(|c| Step::FlushIfExists(c.to_string())));
    steps.extend(CHAINS.iter().map(|c| Step::DeleteChain(c.to_string())));
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(steps: &[Step]) -> Vec<String> {
        steps.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_install_plan_is_exact() {
        let got = lines(&install_plan(&CaptureConfig::default()));
        let want = [
            "iptables -t nat -N PALISADE_INBOUND  # ok if it exists",
            "iptables -t nat -N PALISADE_REDIRECT_IN  # ok if it exists",
            "iptables -t nat -N PALISADE_OUTPUT  # ok if it exists",
            "iptables -t nat -N PALISADE_REDIRECT_OUT  # ok if it exists",
            "iptables -t nat -F PALISADE_INBOUND",
            "iptables -t nat -F PALISADE_REDIRECT_IN",
            "iptables -t nat -F PALISADE_OUTPUT",
            "iptables -t nat -F PALISADE_REDIRECT_OUT",
            "iptables -t nat -A PALISADE_REDIRECT_IN -p tcp -j REDIRECT --to-ports 15006",
            "iptables -t nat -A PALISADE_REDIRECT_OUT -p tcp -j REDIRECT --to-ports 15001",
            "iptables -t nat -A PALISADE_INBOUND -p tcp --dport 15006 -j RETURN",
            "iptables -t nat -A PALISADE_INBOUND -p tcp --dport 15001 -j RETURN",
            "iptables -t nat -A PALISADE_INBOUND -p tcp --dport 15020 -j RETURN",
            "iptables -t nat -A PALISADE_INBOUND -p tcp -j PALISADE_REDIRECT_IN",
            "iptables -t nat -A PALISADE_OUTPUT -p tcp -m owner --uid-owner 2137 -j RETURN",
            "iptables -t nat -A PALISADE_OUTPUT -p tcp -d 127.0.0.1/32 -j RETURN",
            "iptables -t nat -A PALISADE_OUTPUT -p tcp -o lo -j RETURN",
            "iptables -t nat -A PALISADE_OUTPUT -p tcp -j PALISADE_REDIRECT_OUT",
            "iptables -t nat -C PREROUTING -p tcp -j PALISADE_INBOUND || iptables -t nat -A PREROUTING -p tcp -j PALISADE_INBOUND",
            "iptables -t nat -C OUTPUT -p tcp -j PALISADE_OUTPUT || iptables -t nat -A OUTPUT -p tcp -j PALISADE_OUTPUT",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn exclusions_become_returns_before_the_redirect() {
        let config = CaptureConfig {
            exclude_inbound_ports: vec![22, 15020, 22],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec![
                "10.1.2.3/8".parse().unwrap(),
                "169.254.169.254".parse().unwrap(),
            ],
            pod_ip: Some(Ipv4Addr::new(10, 0, 0, 7)),
            ..CaptureConfig::default()
        };
        let got: Vec<String> = chain_rules(&config).iter().map(|r| r.join(" ")).collect();
        let want = [
            "PALISADE_REDIRECT_IN -p tcp -j REDIRECT --to-ports 15006",
            "PALISADE_REDIRECT_OUT -p tcp -j REDIRECT --to-ports 15001",
            "PALISADE_INBOUND -p tcp --dport 15006 -j RETURN",
            "PALISADE_INBOUND -p tcp --dport 15001 -j RETURN",
            "PALISADE_INBOUND -p tcp --dport 15020 -j RETURN",
            "PALISADE_INBOUND -p tcp --dport 22 -j RETURN",
            "PALISADE_INBOUND -p tcp -j PALISADE_REDIRECT_IN",
            "PALISADE_OUTPUT -p tcp -m owner --uid-owner 2137 -j RETURN",
            "PALISADE_OUTPUT -p tcp -d 127.0.0.1/32 -j RETURN",
            "PALISADE_OUTPUT -p tcp ! -d 10.0.0.7/32 -o lo -j RETURN",
            "PALISADE_OUTPUT -p tcp -d 10.0.0.0/8 -j RETURN",
            "PALISADE_OUTPUT -p tcp -d 169.254.169.254/32 -j RETURN",
            "PALISADE_OUTPUT -p tcp --dport 5432 -j RETURN",
            "PALISADE_OUTPUT -p tcp -j PALISADE_REDIRECT_OUT",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn include_list_jumps_only_listed_ports_minus_exclusions() {
        let config = CaptureConfig {
            include_inbound_ports: Some(vec![8080, 9090, 15020, 8080]),
            exclude_inbound_ports: vec![9090],
            ..CaptureConfig::default()
        };
        let got: Vec<String> = chain_rules(&config)
            .iter()
            .filter(|r| r[0] == INBOUND_CHAIN)
            .map(|r| r.join(" "))
            .collect();
        assert_eq!(
            got,
            ["PALISADE_INBOUND -p tcp --dport 8080 -j PALISADE_REDIRECT_IN"]
        );
    }

    #[test]
    fn custom_ports_and_uid_are_used() {
        let config = CaptureConfig {
            inbound_port: 16006,
            outbound_port: 16001,
            proxy_uid: 1000,
            admin_port: 16020,
            ..CaptureConfig::default()
        };
        let all = chain_rules(&config)
            .iter()
            .map(|r| r.join(" "))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(all.contains("REDIRECT --to-ports 16006"));
        assert!(all.contains("REDIRECT --to-ports 16001"));
        assert!(all.contains("--uid-owner 1000 -j RETURN"));
        assert!(all.contains("--dport 16020 -j RETURN"));
        assert!(!all.contains("1500"));
        assert!(!all.contains("2137"));
    }

    #[test]
    fn cleanup_plan_is_exact() {
        let got = lines(&cleanup_plan());
        let want = [
            "while iptables -t nat -C PREROUTING -p tcp -j PALISADE_INBOUND; do iptables -t nat -D PREROUTING -p tcp -j PALISADE_INBOUND; done",
            "while iptables -t nat -C OUTPUT -p tcp -j PALISADE_OUTPUT; do iptables -t nat -D OUTPUT -p tcp -j PALISADE_OUTPUT; done",
            "iptables -t nat -F PALISADE_INBOUND  # ok if it is missing",
            "iptables -t nat -F PALISADE_REDIRECT_IN  # ok if it is missing",
            "iptables -t nat -F PALISADE_OUTPUT  # ok if it is missing",
            "iptables -t nat -F PALISADE_REDIRECT_OUT  # ok if it is missing",
            "iptables -t nat -X PALISADE_INBOUND  # ok if it is missing",
            "iptables -t nat -X PALISADE_REDIRECT_IN  # ok if it is missing",
            "iptables -t nat -X PALISADE_OUTPUT  # ok if it is missing",
            "iptables -t nat -X PALISADE_REDIRECT_OUT  # ok if it is missing",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn cidrs_parse_and_normalise() {
        assert_eq!(
            "10.1.2.3/8".parse::<Ipv4Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Ipv4Cidr>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert_eq!(
            "192.168.1.1".parse::<Ipv4Cidr>().unwrap().to_string(),
            "192.168.1.1/32"
        );
        assert!("10.0.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("fd00::/8".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0/8".parse::<Ipv4Cidr>().is_err());
    }
}
