//! Service-account tokens as the API server authenticates them: verified
//! with the key the token controller signs with (signature, issuer,
//! audience, expiry) and mapped to the user
//! `system:serviceaccount:<ns>:<name>` in the groups
//! `system:serviceaccounts` and `system:serviceaccounts:<ns>`.

use std::path::Path;

use skiff_common::serviceaccount::{
    SERVICE_ACCOUNTS_GROUP, TokenError, TokenVerifier, default_key_paths, load_or_create_key,
};

use super::{TokenAuthenticator, UserInfo};

/// Verifies service-account tokens for the API server.
#[derive(Debug)]
pub struct ServiceAccountTokenAuthenticator(TokenVerifier);

impl ServiceAccountTokenAuthenticator {
    /// The API server's verifier: from `key_file` when given, else from
    /// `<data-dir>/pki/sa.pub`, generating the key pair under
    /// `<data-dir>/pki` first if it does not exist (so that `skiff-control
    /// all`'s token controller and API server share it).
    pub fn for_apiserver(key_file: Option<&Path>, data_dir: &Path) -> Result<Self, TokenError> {
        let verifier = match key_file {
            Some(path) => TokenVerifier::from_key_file(path)?,
            None => {
                let (private, public) = default_key_paths(data_dir);
                if !public.exists() {
                    load_or_create_key(&private)?;
                }
                TokenVerifier::from_key_file(&public)?
            }
        };
        Ok(ServiceAccountTokenAuthenticator(verifier))
    }
}

impl TokenAuthenticator for ServiceAccountTokenAuthenticator {
    fn authenticate_token(&self, token: &str) -> Option<UserInfo> {
        let claims = self.0.verify(token)?;
        let namespace = &claims.kubernetes.namespace;
        Some(UserInfo {
            name: claims.sub.clone(),
            uid: claims.kubernetes.serviceaccount.uid.clone(),
            groups: vec![
                SERVICE_ACCOUNTS_GROUP.to_string(),
                format!("{SERVICE_ACCOUNTS_GROUP}:{namespace}"),
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use skiff_common::serviceaccount::{
        Claims, ISSUER, KubernetesClaims, Reference, TokenIssuer, service_account_user,
    };

    use super::*;

    /// How long the token controller's Secrets' tokens live.
    const SECRET_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

    /// What the token controller signs with.
    struct Signer {
        issuer: TokenIssuer,
    }

    fn load_signer(path: &Path) -> Result<Signer, TokenError> {
        let key = load_or_create_key(path)?;
        Ok(Signer {
            issuer: TokenIssuer::new(&key, path)?,
        })
    }

    fn signer(dir: &Path) -> Signer {
        load_signer(&dir.join("pki").join("sa.key")).expect("signer")
    }

    #[test]
    fn generated_keys_sign_tokens_the_apiserver_accepts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = signer(dir.path());
        let (private, public) = default_key_paths(dir.path());
        assert!(private.exists() && public.exists());
        let authenticator =
            ServiceAccountTokenAuthenticator::for_apiserver(None, dir.path()).expect("verifier");
        let now = jiff::Timestamp::now().as_second();
        let token = signer
            .issuer
            .issue(
                "ns",
                "builder",
                "sa-uid",
                Some(("tok", "secret-uid")),
                now,
                SECRET_TOKEN_LIFETIME,
            )
            .expect("token");
        let user = authenticator
            .authenticate_token(&token)
            .expect("valid token");
        assert_eq!(user.name, "system:serviceaccount:ns:builder");
        assert_eq!(user.uid, "sa-uid");
        assert_eq!(
            user.groups,
            ["system:serviceaccounts", "system:serviceaccounts:ns"]
        );
        // The private key file also works as the API server's key file.
        let from_private =
            ServiceAccountTokenAuthenticator::for_apiserver(Some(&private), dir.path())
                .expect("verifier");
        assert!(from_private.authenticate_token(&token).is_some());
        // Reloading reuses the same key.
        let again = signer_token(&load_signer(&private).expect("reload"), now);
        assert!(authenticator.authenticate_token(&again).is_some());
    }

    fn signer_token(signer: &Signer, now: i64) -> String {
        signer
            .issuer
            .issue(
                "ns",
                "builder",
                "sa-uid",
                None,
                now,
                Duration::from_secs(600),
            )
            .expect("token")
    }

    #[test]
    fn bad_expired_and_foreign_tokens_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = signer(dir.path());
        let authenticator =
            ServiceAccountTokenAuthenticator::for_apiserver(None, dir.path()).expect("verifier");
        let now = jiff::Timestamp::now().as_second();
        let token = signer_token(&signer, now);
        assert!(authenticator.authenticate_token("static-token").is_none());
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(authenticator.authenticate_token(&tampered).is_none());
        let expired = signer_token(&signer, now - 7200);
        assert!(
            authenticator.authenticate_token(&expired).is_none(),
            "expired token accepted"
        );
        // Another cluster's key.
        let other = tempfile::tempdir().expect("tempdir");
        let other_signer = self::signer(other.path());
        assert!(
            authenticator
                .authenticate_token(&signer_token(&other_signer, now))
                .is_none()
        );
        // A wrong issuer.
        let wrong = Claims {
            iss: "someone-else".into(),
            sub: service_account_user("ns", "builder"),
            aud: vec![ISSUER.into()],
            exp: now + 600,
            iat: now,
            nbf: now,
            kubernetes: KubernetesClaims {
                namespace: "ns".into(),
                serviceaccount: Reference {
                    name: "builder".into(),
                    uid: "u".into(),
                },
                secret: None,
                pod: None,
            },
        };
        let forged = signer.issuer.sign(&wrong).expect("encode");
        assert!(authenticator.authenticate_token(&forged).is_none());
        let mut wrong_audience = wrong.clone();
        wrong_audience.iss = ISSUER.into();
        wrong_audience.aud = vec!["vault".into()];
        let forged = signer.issuer.sign(&wrong_audience).expect("encode");
        assert!(authenticator.authenticate_token(&forged).is_none());
    }
}
