//! Dials the operator and does TLS itself, so the operator's certificate
//! goes through our SPIFFE verifier and ours comes from the `CertStore`
//! (tonic's own TLS knows only host names and fixed identities).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

#[derive(Clone)]
pub(crate) struct Connector {
    address: Arc<str>,
    server_name: ServerName<'static>,
    tls: TlsConnector,
}

impl Connector {
    pub(crate) fn new(
        address: Arc<str>,
        server_name: ServerName<'static>,
        config: Arc<ClientConfig>,
    ) -> Self {
        Self {
            address,
            server_name,
            tls: TlsConnector::from(config),
        }
    }
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = io::Result<TokioIo<TlsStream<TcpStream>>>> + Send>>;

impl tonic::codegen::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    // The URI is tonic's placeholder; the configured address is dialled.
    fn call(&mut self, _uri: Uri) -> Self::Future {
        let address = self.address.clone();
        let server_name = self.server_name.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&*address).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(server_name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
