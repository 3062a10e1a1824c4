//! HTTP/1.1 `Upgrade` (WebSocket and others): once a request that passed the
//! whole pipeline is answered `101 Switching Protocols` by the app, the two
//! upgraded connections are joined and bytes copied both ways until either
//! side closes. HTTP/2 extended CONNECT (RFC 8441) is not supported.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// Joins the client's and the app's upgraded connections in a task of its
/// own (the HTTP connection task ends once it hands the client's over).
pub fn join(client: OnUpgrade, app: OnUpgrade) {
    tokio::spawn(async move {
        let (client, app) = match tokio::try_join!(client, app) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut app = TokioIo::new(app);
        match tokio::io::copy_bidirectional(&mut client, &mut app).await {
            Ok((up, down)) => tracing::debug!(up, down, "upgraded connection closed"),
            Err(e) => tracing::debug!(error = %e, "upgraded connection ended with an error"),
        }
    });
}
