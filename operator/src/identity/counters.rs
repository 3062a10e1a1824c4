//! Issuance counters. Plain atomics for now; the admin port exports them as
//! metrics later.

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
}
