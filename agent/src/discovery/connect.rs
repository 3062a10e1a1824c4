//! Dials the operator with the identity client's connector: TLS done by us,
//! so the operator's certificate goes through our SPIFFE verifier and ours
//! comes from the `CertStore`.

pub(crate) use crate::identity::OperatorConnector as Connector;
