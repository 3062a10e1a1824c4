//! HTTP/1.1 `Upgrade` (WebSocket and others): once a request that passed the
//! whole pipeline is answered `101 Switching Protocols` by the app, the two
//! upgraded connections are joined and bytes copied both ways until either
//! side closes, or until a new policy no longer admits the request that
//! opened the tunnel ([`super::tunnel`]). HTTP/2 extended CONNECT (RFC 8441)
//! is not supported.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::policy::PolicyUpdates;
use super::request::AdmittedRequest;
use super::tunnel::{self, TunnelEnd};

/// Joins the client's and the app's upgraded connections in a task of its
/// own (the HTTP connection task ends once it hands the client's over).
pub(crate) fn join(
    client: OnUpgrade,
    app: OnUpgrade,
    updates: PolicyUpdates,
    admitted: AdmittedRequest,
) {
    tokio::spawn(async move {
        let (client, app) = match tokio::try_join!(client, app) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let request = &admitted;
        let end = tunnel::run(TokioIo::new(client), TokioIo::new(app), updates, |policy| {
            request.still_allowed(policy)
        })
        .await;
        match end {
            TunnelEnd::Closed(Ok((up, down))) => {
                tracing::debug!(up, down, "upgraded connection closed")
            }
            TunnelEnd::Closed(Err(e)) => {
                tracing::debug!(error = %e, "upgraded connection ended with an error")
            }
            TunnelEnd::Revoked(revoked, policy) => admitted.revoked(&revoked, &policy),
        }
    });
}
