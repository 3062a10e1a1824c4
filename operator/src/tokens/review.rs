//! Kubernetes mode: projected ServiceAccount tokens checked with the
//! TokenReview API (`POST /apis/authentication.k8s.io/v1/tokenreviews`).
//!
//! A token is accepted only when the API server says `authenticated: true`,
//! lists our audience in `status.audiences`, and names a ServiceAccount
//! (`system:serviceaccount:<ns>:<sa>`). Anything else — a user account, a
//! missing audience list, an error string — is a rejection.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::Api;
use kube::api::PostParams;

use super::{ServiceAccount, TokenError, TokenValidator, ValidateFuture};

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    timeout: Duration,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audience: impl Into<String>) -> Self {
        Self {
            client,
            audience: audience.into(),
            timeout: Duration::from_secs(10),
        }
    }

    async fn review(&self, token: &str) -> Result<ServiceAccount, TokenError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer =
            tokio::time::timeout(self.timeout, api.create(&PostParams::default(), &request))
                .await
                .map_err(|_| TokenError::Unavailable("TokenReview timed out".into()))?
                // kube's error text carries the API server's Status message, never
                // the request body, so it is safe to log.
                .map_err(|e| TokenError::Unavailable(format!("TokenReview failed: {e}")))?;
        judge(answer.status.as_ref(), &self.audience)
    }
}

impl TokenValidator for TokenReviewer {
    fn validate<'a>(&'a self, token: &'a str) -> ValidateFuture<'a> {
        Box::pin(self.review(token))
    }
}

/// Decides on a TokenReview answer.
pub fn judge(
    status: Option<&TokenReviewStatus>,
    audience: &str,
) -> Result<ServiceAccount, TokenError> {
    let status = status.ok_or_else(|| TokenError::Rejected("TokenReview has no status".into()))?;
    if status.authenticated != Some(true) {
        // The API server's error says why (expired, bad audience, ...); it
        // names no secret.
        let why = status.error.as_deref().unwrap_or("not authenticated");
        return Err(TokenError::Rejected(format!("TokenReview: {why}")));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(TokenError::Rejected(format!(
            "TokenReview did not confirm audience {audience:?} (got {audiences:?})"
        )));
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    let Some(rest) = username.strip_prefix(SERVICE_ACCOUNT_PREFIX) else {
        return Err(TokenError::Rejected(format!(
            "{username:?} is not a ServiceAccount"
        )));
    };
    let Some((namespace, name)) = rest.split_once(':') else {
        return Err(TokenError::Rejected(format!(
            "malformed ServiceAccount username {username:?}"
        )));
    };
    ServiceAccount::new(namespace, name).map_err(|e| TokenError::Rejected(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(authenticated: bool, audiences: &[&str], user: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|s| s.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.to_owned()),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    #[test]
    fn accepts_only_authenticated_service_accounts_with_our_audience() {
        let ok = status(true, &["palisade.dev"], "system:serviceaccount:shop:orders");
        assert_eq!(
            judge(Some(&ok), "palisade.dev").unwrap(),
            ServiceAccount::new("shop", "orders").unwrap()
        );
        for bad in [
            status(
                false,
                &["palisade.dev"],
                "system:serviceaccount:shop:orders",
            ),
            status(
                true,
                &["https://kubernetes.default.svc"],
                "system:serviceaccount:shop:orders",
            ),
            status(true, &[], "system:serviceaccount:shop:orders"),
            status(true, &["palisade.dev"], "alice"),
            status(true, &["palisade.dev"], "system:serviceaccount:shop"),
            status(true, &["palisade.dev"], "system:serviceaccount:shop:a:b"),
            status(true, &["palisade.dev"], "system:serviceaccount:Shop:orders"),
        ] {
            assert!(
                matches!(
                    judge(Some(&bad), "palisade.dev"),
                    Err(TokenError::Rejected(_))
                ),
                "{bad:?}"
            );
        }
        assert!(judge(None, "palisade.dev").is_err());
        let mut no_audiences = ok.clone();
        no_audiences.audiences = None;
        assert!(judge(Some(&no_audiences), "palisade.dev").is_err());
    }
}
