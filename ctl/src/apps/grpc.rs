//! The demo gRPC service, `demo.inventory.v1.Inventory`, written against
//! tonic's generic server and client (no code generation: two messages,
//! two unary methods):
//!
//! ```proto
//! service Inventory {
//!   rpc GetItem(ItemRequest) returns (Item);     // the item and who asked
//!   rpc DeleteItem(ItemRequest) returns (Item);  // the demo policy refuses it
//! }
//! message ItemRequest { string sku = 1; }
//! message Item { string sku = 1; string name = 2; uint32 stock = 3; string caller = 4; }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use http::uri::PathAndQuery;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tonic::server::UnaryService;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

pub const GET_ITEM: &str = "/demo.inventory.v1.Inventory/GetItem";
pub const DELETE_ITEM: &str = "/demo.inventory.v1.Inventory/DeleteItem";

#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemRequest {
    #[prost(string, tag = "1")]
    pub sku: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Item {
    #[prost(string, tag = "1")]
    pub sku: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(uint32, tag = "3")]
    pub stock: u32,
    /// The caller's SPIFFE ID, as the agent vouched for it.
    #[prost(string, tag = "4")]
    pub caller: String,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

#[derive(Clone, Copy)]
struct Method {
    delete: bool,
}

impl UnaryService<ItemRequest> for Method {
    type Response = Item;
    type Future = BoxFuture<Result<Response<Item>, Status>>;

    fn call(&mut self, request: Request<ItemRequest>) -> Self::Future {
        let delete = self.delete;
        Box::pin(async move {
            let caller = request
                .metadata()
                .get("x-forwarded-client-cert")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').find_map(|p| p.strip_prefix("URI=")))
                .unwrap_or("")
                .to_owned();
            let sku = request.into_inner().sku;
            Ok(Response::new(Item {
                name: format!("demo item {sku}"),
                stock: if delete { 0 } else { 7 },
                sku,
                caller,
            }))
        })
    }
}

/// Serves the Inventory service over h2c on `listener`.
pub async fn serve(listener: TcpListener) {
    while let Ok((tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let delete = match req.uri().path() {
                        GET_ITEM => false,
                        DELETE_ITEM => true,
                        _ => {
                            let status = Status::unimplemented("no such method");
                            return Ok::<_, std::convert::Infallible>(status.into_http());
                        }
                    };
                    let mut grpc =
                        tonic::server::Grpc::new(ProstCodec::<Item, ItemRequest>::default());
                    Ok(grpc.unary(Method { delete }, req).await)
                },
            );
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// One unary call of `method` (a path like [`GET_ITEM`]) on `addr` (h2c).
pub async fn call(addr: SocketAddr, method: &'static str, sku: &str) -> Result<Item, Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Status::internal(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot connect to {addr}: {e}")))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = ProstCodec::<ItemRequest, Item>::default();
    let response = grpc
        .unary(
            Request::new(ItemRequest {
                sku: sku.to_owned(),
            }),
            PathAndQuery::from_static(method),
            codec,
        )
        .await?;
    Ok(response.into_inner())
}
