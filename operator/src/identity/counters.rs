//! Issuance counters: plain atomics bumped by `Identity.Certify`, exported
//! as Prometheus metrics on the admin port (15014).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct IssuanceCounters {
    issued: AtomicU64,
    refused_token: AtomicU64,
    refused_csr: AtomicU64,
    failed: AtomicU64,
}

/// A consistent-enough copy of the counters for reporting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub issued: u64,
    /// Refused because the token was not accepted.
    pub refused_token: u64,
    /// Refused because the CSR was invalid.
    pub refused_csr: u64,
    /// Could not be served (token review unavailable, signing failed).
    pub failed: u64,
}

impl CountersSnapshot {
    /// Every refusal, whatever the reason.
    pub fn refused(&self) -> u64 {
        self.refused_token + self.refused_csr
    }

    /// Prometheus text (format 0.0.4). Refusals are one metric with a
    /// `reason` label, so `sum()` over it is every refusal.
    pub fn render_prometheus(&self, out: &mut String) {
        let name = "palisade_operator_certificates_issued_total";
        let _ = writeln!(out, "# HELP {name} Workload certificates issued.");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {}", self.issued);

        let name = "palisade_operator_certificates_refused_total";
        let _ = writeln!(
            out,
            "# HELP {name} Certify requests refused, by reason (token: not accepted, csr: invalid)."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name}{{reason=\"token\"}} {}", self.refused_token);
        let _ = writeln!(out, "{name}{{reason=\"csr\"}} {}", self.refused_csr);

        let name = "palisade_operator_certificates_failed_total";
        let _ = writeln!(
            out,
            "# HELP {name} Certify requests that could not be served (token review unavailable, signing failed)."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {}", self.failed);
    }
}

impl IssuanceCounters {
    pub fn issued(&self) {
        self.issued.fetch_add(1, Ordering::Relaxed);
    }
    pub fn refused_token(&self) {
        self.refused_token.fetch_add(1, Ordering::Relaxed);
    }
    pub fn refused_csr(&self) {
        self.refused_csr.fetch_add(1, Ordering::Relaxed);
    }
    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            issued: self.issued.load(Ordering::Relaxed),
            refused_token: self.refused_token.load(Ordering::Relaxed),
            refused_csr: self.refused_csr.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// [`CountersSnapshot::render_prometheus`] of the current values.
    pub fn render_prometheus(&self, out: &mut String) {
        self.snapshot().render_prometheus(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter_with_its_value_and_type() {
        let c = IssuanceCounters::default();
        c.issued();
        c.issued();
        c.refused_token();
        c.refused_csr();
        c.refused_csr();
        c.refused_csr();
        c.failed();
        let mut out = String::new();
        c.render_prometheus(&mut out);
        for sample in [
            "palisade_operator_certificates_issued_total 2\n",
            "palisade_operator_certificates_refused_total{reason=\"token\"} 1\n",
            "palisade_operator_certificates_refused_total{reason=\"csr\"} 3\n",
            "palisade_operator_certificates_failed_total 1\n",
        ] {
            assert!(out.contains(sample), "{sample:?} missing from:\n{out}");
        }
        for name in [
            "palisade_operator_certificates_issued_total",
            "palisade_operator_certificates_refused_total",
            "palisade_operator_certificates_failed_total",
        ] {
            // Exactly one TYPE line per metric, even with several samples.
            let ty = format!("# TYPE {name} counter\n");
            assert_eq!(out.matches(&ty).count(), 1, "{out}");
        }
        // Every line is a comment or `name[{labels}] value`.
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect(line);
            assert!(value.parse::<u64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn a_fresh_set_renders_zeros() {
        let mut out = String::new();
        IssuanceCounters::default().render_prometheus(&mut out);
        assert!(
            out.contains("palisade_operator_certificates_issued_total 0\n"),
            "{out}"
        );
        assert!(
            out.contains("palisade_operator_certificates_refused_total{reason=\"token\"} 0\n"),
            "{out}"
        );
    }
}
