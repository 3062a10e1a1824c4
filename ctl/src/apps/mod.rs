//! The built-in demo services: an HTTP JSON API and a gRPC service. `demo`
//! runs them in-process; `palisadectl demo-app` runs one as its own process,
//! which is what `examples/quickstart/mesh.yaml` starts behind each agent.

pub mod grpc;
pub mod http;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, ValueEnum)]
pub enum Kind {
    /// The HTTP JSON API (orders, payments, partner quotes, /v1, /admin, /call/NAME/…).
    Http,
    /// The gRPC service demo.inventory.v1.Inventory (GetItem, DeleteItem).
    Grpc,
}

#[derive(Args)]
pub struct DemoAppArgs {
    kind: Kind,
    /// Where to listen, e.g. 127.0.0.1:9081.
    #[arg(long)]
    listen: SocketAddr,
    /// The name the app puts in its answers.
    #[arg(long, default_value = "demo")]
    name: String,
    /// HTTP app: a service `/call/NAME/...` reaches, NAME=HOST:PORT (repeatable).
    #[arg(long, value_parser = parse_upstream, value_name = "NAME=ADDR")]
    upstream: Vec<(String, SocketAddr)>,
}

fn parse_upstream(text: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=HOST:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not HOST:PORT: {e}"))?;
    Ok((name.to_owned(), addr))
}

pub fn run(args: DemoAppArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        crate::output::error(format_args!(
            "demo-app {} listening on {}",
            args.name, args.listen
        ));
        let serve: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> = match args.kind {
            Kind::Http => Box::pin(http::serve(
                listener,
                http::HttpApp {
                    name: args.name,
                    upstreams: args.upstream.into_iter().collect::<BTreeMap<_, _>>(),
                    seen: Default::default(),
                },
            )),
            Kind::Grpc => Box::pin(grpc::serve(listener)),
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            () = serve => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}
