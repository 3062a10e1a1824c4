//! What a lenient back end would read differently is refused, through the
//! real `palisade-agent run` in front of a recording backend (issue 8,
//! `docs/security.md`). Each attack is written byte for byte on a real mTLS
//! connection, and each refusal is checked three ways: the answer (400 with
//! the fixed body), the audit record's reason, and the backend, which saw
//! nothing (or exactly the request as policy judged it).
//!
//! Also here: 401 only where a credential could change the decision, and an
//! audit-mode policy at `samplePercent: 0` recording every would-deny.

mod fixtures;

use fixtures::{
    AUDIT_LOG, OTHER, Req, Resp, Setup, WEB, assert_denied, assert_ok, bounded, deny_request_id,
    setup_with, sha256_hex,
};
use palisade_e2e::log_field;

const PARTNER_KEY: &str = "pk-refusals-9d4c2b7e1a";

async fn setup() -> Setup {
    setup_with(
        "refusals.yaml",
        &[("PARTNER_SHA", &sha256_hex(PARTNER_KEY))],
        AUDIT_LOG,
    )
    .await
}

/// `raw` as the client wrote it; asserts a 400 with `reason` in the audit
/// record and nothing at the app.
async fn refused_400(s: &Setup, raw: &str, reason: &str) {
    let web = s.pki.client(WEB);
    let before = s.backend.seen().len();
    let resp = s.agent_send_raw(&web, raw).await;
    assert_denied(&resp, 400, "bad_request", raw);
    let line = s.audit_record(&deny_request_id(&resp)).await;
    assert_eq!(
        log_field(&line, "reason").as_deref(),
        Some(reason),
        "{raw}: {line}"
    );
    assert_eq!(s.backend.seen().len(), before, "{raw} reached the app");
}

trait RawSend {
    async fn agent_send_raw(&self, client: &fixtures::Client, raw: &str) -> Resp;
}

impl RawSend for Setup {
    async fn agent_send_raw(&self, client: &fixtures::Client, raw: &str) -> Resp {
        client.send_raw(self.agent.addr, raw.as_bytes()).await
    }
}

#[tokio::test]
async fn path_parameters_and_overlong_utf8_never_reach_a_lenient_back_end() {
    bounded("path tricks", 60, async {
        let s = setup().await;
        // A servlet container strips `;…` per segment: these are /admin to it.
        for target in ["/public/..;/admin/users", "/admin;x/users", "/public/.;/x"] {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: orders.shop\r\nConnection: close\r\n\r\n");
            refused_400(&s, &raw, "request.path_parameter").await;
        }
        // `%C0%AE` is an overlong `.` that lenient decoders accept.
        let raw = "GET /public/%C0%AE%C0%AE/admin/users HTTP/1.1\r\nHost: orders.shop\r\nConnection: close\r\n\r\n";
        refused_400(&s, raw, "request.path_not_utf8").await;
        // Real UTF-8 still passes, as sent.
        let resp = s.send(&s.pki.client(WEB), Req::get("/public/caf%C3%A9")).await;
        assert_ok(&resp, "UTF-8 path");
        assert_eq!(s.backend.seen_under("/public")[0].target, "/public/caf%C3%A9");
    })
    .await;
}

#[tokio::test]
async fn ambiguous_headers_are_refused() {
    bounded("ambiguous headers", 60, async {
        let s = setup().await;
        // CGI-style back ends read `x_role` as `X-Role`.
        refused_400(
            &s,
            "GET /public/x HTTP/1.1\r\nHost: orders.shop\r\nx_role: admin\r\nConnection: close\r\n\r\n",
            "request.underscore_header",
        )
        .await;
        refused_400(
            &s,
            "POST /public/x HTTP/1.1\r\nHost: orders.shop\r\nContent-Type: application/json\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            "request.duplicate_content_type",
        )
        .await;
        // h2c over an HTTP/1.1 upgrade would carry requests the agent never
        // sees one by one; other protocols are not on the allow-list.
        refused_400(
            &s,
            "GET /public/x HTTP/1.1\r\nHost: orders.shop\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
            "request.upgrade_refused",
        )
        .await;
        refused_400(
            &s,
            "GET /public/x HTTP/1.1\r\nHost: orders.shop\r\nConnection: Upgrade\r\nUpgrade: TLS/1.2\r\n\r\n",
            "request.upgrade_refused",
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn a_client_breaking_its_chunked_framing_gets_400_not_502() {
    bounded("chunked framing", 60, async {
        let s = setup().await;
        let raw = "POST /public/upload HTTP/1.1\r\nHost: orders.shop\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nabc\r\n0\r\n\r\n";
        let resp = s.agent_send_raw(&s.pki.client(WEB), raw).await;
        assert_denied(&resp, 400, "bad_request", "bad chunk size");
        let line = s.audit_record(&deny_request_id(&resp)).await;
        assert_eq!(log_field(&line, "reason").as_deref(), Some("request.body_malformed"), "{line}");
        // The app never received a complete request, and the agent did not
        // blame it.
        assert!(s.backend.seen_under("/public/upload").is_empty());
        assert!(!s.log().contains("app unreachable"), "{}", s.log());
    })
    .await;
}

#[tokio::test]
async fn an_absolute_form_target_names_the_host() {
    bounded("absolute-form", 60, async {
        let s = setup().await;
        let web = s.pki.client(WEB);
        // The authority is the host: matched and forwarded as such.
        let resp = s
            .agent_send_raw(
                &web,
                "GET http://orders.shop/public/abs?q=1 HTTP/1.1\r\nHost: orders.shop\r\nConnection: close\r\n\r\n",
            )
            .await;
        assert_ok(&resp, "absolute-form");
        let seen = s.backend.seen_under("/public/abs");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].target, "/public/abs?q=1");
        assert_eq!(seen[0].header("host"), Some("orders.shop"));
        // The path of an absolute-form target meets the same rules.
        let resp = s
            .agent_send_raw(
                &web,
                "GET http://orders.shop/admin/users HTTP/1.1\r\nHost: orders.shop\r\nConnection: close\r\n\r\n",
            )
            .await;
        assert_denied(&resp, 403, "forbidden", "absolute-form /admin");
        // So does its host, even without a Host header.
        let resp = s
            .agent_send_raw(
                &web,
                "GET http://admin.orders.shop/public/x HTTP/1.1\r\nConnection: close\r\n\r\n",
            )
            .await;
        assert_denied(&resp, 403, "forbidden", "absolute-form admin host");
        // A Host that disagrees: a proxy and an app could each pick one.
        refused_400(
            &s,
            "GET http://admin.orders.shop/public/x HTTP/1.1\r\nHost: orders.shop\r\nConnection: close\r\n\r\n",
            "request.host_mismatch",
        )
        .await;
        assert!(s.backend.seen_under("/admin").is_empty());
        assert_eq!(s.backend.seen_under("/public/x").len(), 0);
    })
    .await;
}

#[tokio::test]
async fn method_overrides_and_client_addresses_written_by_the_client_never_reach_the_app() {
    bounded("forwarding headers", 60, async {
        let s = setup().await;
        let resp = s
            .send(
                &s.pki.client(WEB),
                Req::post("/public/form")
                    .header("X-HTTP-Method-Override", "DELETE")
                    .header("X-HTTP-Method", "DELETE")
                    .header("X-Method-Override", "DELETE")
                    .header("X-Forwarded-For", "203.0.113.9")
                    .header("Forwarded", "for=203.0.113.9")
                    .header("X-Real-IP", "203.0.113.9")
                    .body("{}"),
            )
            .await;
        assert_ok(&resp, "POST with overrides");
        let seen = &s.backend.seen_under("/public/form")[0];
        assert_eq!(seen.method, "POST");
        for spoofed in [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "forwarded",
            "x-real-ip",
        ] {
            assert!(seen.header(spoofed).is_none(), "{spoofed} reached the app");
        }
        // The client is the connection's peer (not a trusted hop).
        assert_eq!(seen.header_all("x-forwarded-for"), ["127.0.0.1"]);
    })
    .await;
}

#[tokio::test]
async fn status_401_only_where_a_credential_could_change_the_decision() {
    bounded("401 or 403", 60, async {
        let s = setup().await;
        let other = s.pki.client(OTHER);
        // A verified peer that only `web` may be: no credential helps.
        let resp = s.send(&other, Req::get("/internal/x")).await;
        assert_denied(&resp, 403, "forbidden", "identity rule");
        assert!(resp.header("www-authenticate").is_none());
        // Without the API key /partners asks for: presenting one could help.
        let resp = s.send(&other, Req::get("/partners/x")).await;
        assert_denied(&resp, 401, "unauthorized", "no API key");
        let resp = s
            .send(&other, Req::get("/partners/x").header("x-api-key", "wrong"))
            .await;
        assert_denied(&resp, 401, "unauthorized", "a wrong API key");
        let resp = s
            .send(
                &other,
                Req::get("/partners/x").header("x-api-key", PARTNER_KEY),
            )
            .await;
        assert_ok(&resp, "partner");
        assert!(s.backend.seen_under("/internal").is_empty());
        let partners = s.backend.seen_under("/partners");
        assert_eq!(partners.len(), 1);
        assert!(partners[0].header("x-api-key").is_none());
    })
    .await;
}

#[tokio::test]
async fn audit_mode_records_every_would_deny_at_sample_percent_zero() {
    bounded("audit mode unsampled", 60, async {
        let s = setup_with("audit_unsampled.yaml", &[], AUDIT_LOG).await;
        let web = s.pki.client(WEB);
        // Reads first (audit mode agrees with them), then writes it would
        // deny; the app sees every request, with its id.
        for i in 0..5 {
            assert_ok(
                &s.send(&web, Req::get(&format!("/catalog/items/{i}"))).await,
                "read",
            );
        }
        for i in 0..5 {
            let resp = s
                .send(
                    &web,
                    Req::new("PUT", &format!("/catalog/items/{i}")).body("{}"),
                )
                .await;
            assert_ok(&resp, "served: audit mode never blocks");
        }
        let seen = s.backend.seen();
        let ids = |method: &str| -> Vec<String> {
            seen.iter()
                .filter(|r| r.method == method)
                .filter_map(|r| r.header("x-request-id").map(str::to_owned))
                .collect()
        };
        let (reads, writes) = (ids("GET"), ids("PUT"));
        assert_eq!((reads.len(), writes.len()), (5, 5));
        // Every would-deny is recorded, whatever the sampling.
        for id in &writes {
            let line = s.audit_record(id).await;
            assert_eq!(
                log_field(&line, "shadow_reason").as_deref(),
                Some("authz.deny_rule"),
                "{line}"
            );
            assert_eq!(
                log_field(&line, "decision").as_deref(),
                Some("allow"),
                "{line}"
            );
        }
        // The reads came before the last write's record, and are not
        // sampled at 0 %.
        let lines = s.audit_lines();
        for id in &reads {
            assert!(
                !lines.iter().any(|l| l.contains(id.as_str())),
                "read {id} was recorded"
            );
        }
    })
    .await;
}
