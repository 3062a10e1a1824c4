//! `palisade-collector`: the audit collector.
//!
//! The ingest service, storage and query API follow (see the open issues);
//! this build describes the contract it will serve.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "palisade-collector",
    version,
    about = "Palisade audit collector: receives audit events from agents over mTLS, stores and serves them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the gRPC services this collector implements.
    Services,
}

fn main() {
    match Cli::parse().command {
        Command::Services => {
            println!(
                "{}/Report (port 15030, mTLS)",
                palisade_proto::audit::v1::audit_server::SERVICE_NAME
            );
        }
    }
}
