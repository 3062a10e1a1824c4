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
}

/// Audit event stream.
pub mod audit {
    pub mod v1 {
        tonic::include_proto!("palisade.audit.v1");
    }
}
