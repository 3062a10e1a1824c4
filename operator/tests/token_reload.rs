//! Local-mode token rotation and revocation against the real
//! `palisade-operator` binary: the token file is rewritten while the
//! operator runs, and `Identity.Certify` follows it without a restart.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use palisade_proto::identity::v1::identity_client::IdentityClient;
use tonic::Code;
use tonic::transport::Channel;

const TOKEN_A: &str = "tok-orders-9f2c41d7a0b3e8c5";
const TOKEN_B: &str = "tok-payments-1b7e93c0d4a2f6e8";
const ID_B: &str = "spiffe://cluster.local/ns/shop/sa/payments";

/// Replaces the token file in one step (write elsewhere, then rename), as
/// the docs tell operators to, so the operator never reads half a file.
fn replace_tokens(path: &Path, text: &str) {
    let staging = path.with_extension("new");
    std::fs::write(&staging, text).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

/// Certify outcome for `token`: Ok(SPIFFE ID) or the refusal code.
async fn certify_as(client: &mut IdentityClient<Channel>, token: &str) -> Result<String, Code> {
    certify_fresh(client, token)
        .await
        .map(|r| r.spiffe_id)
        .map_err(|s| s.code())
}

/// Retries until `token` gets `want`, for at most 10 s (the poll interval
/// is 100 ms).
async fn eventually(client: &mut IdentityClient<Channel>, token: &str, want: Result<&str, Code>) {
    poll(async || {
        let got = certify_as(client, token).await;
        if got.as_deref().map_err(|c| *c) == want {
            Ok(())
        } else {
            Err(format!("still {got:?}, expected {want:?}"))
        }
    })
    .await
}

#[tokio::test]
async fn edits_of_the_token_file_apply_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = write_tokens(tmp.path(), &[(TOKEN_A, "shop", "orders")]);
    let op = spawn_operator(
        &tmp.path().join("state"),
        &tokens,
        &["--tokens-poll-interval", "100ms"],
    );
    let mut client = op.client().await;
    assert!(certify_as(&mut client, TOKEN_A).await.is_ok());
    assert_eq!(
        certify_as(&mut client, TOKEN_B).await,
        Err(Code::Unauthenticated)
    );

    // Rotation: B is added next to A.
    replace_tokens(
        &tokens,
        &format!("{TOKEN_A} shop orders\n{TOKEN_B} shop payments\n"),
    );
    eventually(&mut client, TOKEN_B, Ok(ID_B)).await;
    assert!(certify_as(&mut client, TOKEN_A).await.is_ok());
    wait_for_log(&op, "token file reloaded").await;

    // Revocation: A is removed.
    replace_tokens(&tokens, &format!("{TOKEN_B} shop payments\n"));
    eventually(&mut client, TOKEN_A, Err(Code::Unauthenticated)).await;
    assert_eq!(certify_as(&mut client, TOKEN_B).await.as_deref(), Ok(ID_B));

    // A half-finished edit that would re-admit A if applied line by line:
    // rejected as a whole, B still works, A stays revoked.
    replace_tokens(
        &tokens,
        &format!("{TOKEN_A} shop orders\n{TOKEN_B} shop payments\nhalf-typed shop\n"),
    );
    let line = wait_for_log(&op, "token file rejected").await;
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&tokens.display().to_string()), "{line}");
    assert!(line.contains("line 3"), "{line}");
    assert!(line.contains("previous tokens stay in force"), "{line}");
    assert_eq!(certify_as(&mut client, TOKEN_B).await.as_deref(), Ok(ID_B));
    assert_eq!(
        certify_as(&mut client, TOKEN_A).await,
        Err(Code::Unauthenticated),
        "a broken token file re-admitted a revoked token"
    );
    // Still so a few polls later (the broken content is not half-applied
    // on a later look either).
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(certify_as(&mut client, TOKEN_B).await.as_deref(), Ok(ID_B));
    assert_eq!(
        certify_as(&mut client, TOKEN_A).await,
        Err(Code::Unauthenticated)
    );

    let log = op.log();
    assert!(!log.contains(TOKEN_A), "a token reached the log");
    assert!(!log.contains(TOKEN_B), "a token reached the log");
}

#[test]
fn a_broken_token_file_still_stops_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN_A} shop orders\nhalf-typed shop\n")).unwrap();
    let stderr = serve_must_fail(
        &tmp.path().join("state"),
        &tokens,
        &["--admin", "", "--tokens-poll-interval", "100ms"],
    );
    assert!(stderr.contains("line 2"), "{stderr}");
    // Tokens are checked before the CA: nothing was created.
    assert!(!tmp.path().join("state").exists());
}

#[test]
fn the_poll_interval_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = write_tokens(tmp.path(), &[(TOKEN_A, "shop", "orders")]);
    let stderr = serve_must_fail(
        &tmp.path().join("state"),
        &tokens,
        &["--admin", "", "--tokens-poll-interval", "1ms"],
    );
    assert!(stderr.contains("at least 50ms"), "{stderr}");
}
