//! Palisade wire contracts, generated from `proto/` at build time.
//!
//! Package names are versioned (`palisade.<area>.v1`); a breaking change gets
//! a new version beside the old one.

/// The compiled policy the agent enforces.
pub mod policy {
    pub mod v1 {
        tonic::include_proto!("palisade.policy.v1");
    }
}

/// Certificate issuance.
pub mod identity {
    pub mod v1 {
        tonic::include_proto!("palisade.identity.v1");
    }
}

/// Policy distribution.
pub mod discovery {
    pub mod v1 {
        tonic::include_proto!("palisade.discovery.v1");
    }

    /// Limits both ends of `Discovery.Watch` keep to.
    pub mod limits {
        /// A NACK reason is cut to this many bytes (by the agent before
        /// sending, by the operator before keeping or logging it).
        pub const MAX_NACK_REASON_BYTES: usize = 1024;
        /// The most `WorkloadRef.endpoints` one agent may advertise; the
        /// operator refuses a subscription with more.
        pub const MAX_ENDPOINTS: usize = 16;

        /// Cuts `reason` to [`MAX_NACK_REASON_BYTES`] on a character boundary.
        pub fn truncate_reason(reason: &str) -> &str {
            if reason.len() <= MAX_NACK_REASON_BYTES {
                return reason;
            }
            let mut end = MAX_NACK_REASON_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            &reason[..end]
        }

        #[cfg(test)]
        mod tests {
            use super::*;

            #[test]
            fn reasons_are_cut_on_a_char_boundary() {
                assert_eq!(truncate_reason("abc"), "abc");
                // "é" is two bytes: a cut inside it backs off to before it.
                let long = format!("{}é", "a".repeat(MAX_NACK_REASON_BYTES - 1));
                assert_eq!(truncate_reason(&long).len(), MAX_NACK_REASON_BYTES - 1);
                let exact = "a".repeat(MAX_NACK_REASON_BYTES + 5);
                assert_eq!(truncate_reason(&exact).len(), MAX_NACK_REASON_BYTES);
            }
        }
    }
}

/// Audit event stream.
pub mod audit {
    pub mod v1 {
        tonic::include_proto!("palisade.audit.v1");
    }
}
