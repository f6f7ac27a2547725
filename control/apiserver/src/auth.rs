//! Authentication and the authorizer hook.
//!
//! Like upstream's API server, a request is authenticated by its verified
//! client certificate (common name → user name, organizations → groups) or
//! by a bearer token (a static token file, tokens added at runtime, or any
//! [`TokenAuthenticator`] such as the service-account token controller's).
//! Authenticated users also get the group `system:authenticated`. The
//! request is then described as [`RequestAttributes`] with upstream's
//! request-info rules and handed to an [`Authorizer`]; [`middleware`] wires
//! both into axum and answers 401/403 with upstream-shaped `Status` objects.

pub mod serviceaccount;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{HeaderMap, Method, Uri};

use crate::serve::PeerCertificates;
use crate::status::ApiError;

/// The group every authenticated user belongs to.
pub const AUTHENTICATED_GROUP: &str = "system:authenticated";
/// The user name of requests that carry no credentials.
pub const ANONYMOUS_USER: &str = "system:anonymous";
/// The group of requests that carry no credentials.
pub const UNAUTHENTICATED_GROUP: &str = "system:unauthenticated";
/// The non-resource paths anonymous users may `get`, as upstream's
/// `system:public-info-viewer` cluster role grants.
pub const PUBLIC_PATHS: &[&str] = &["/healthz", "/livez", "/readyz", "/version", "/version/"];

/// The websocket subprotocol prefix that carries a bearer token for clients
/// that cannot set headers on websocket requests (kubectl exec/attach).
const WEBSOCKET_TOKEN_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

/// Who made a request.
#[derive(Clone, Debug, PartialEq)]
pub struct UserInfo {
    /// The user name, e.g. `skiff-admin` or `system:serviceaccount:ns:name`.
    pub name: String,
    /// A unique id of the user, empty when the authenticator knows none.
    pub uid: String,
    /// The groups the user belongs to.
    pub groups: Vec<String>,
}

impl UserInfo {
    /// A user with `name`, no uid and `groups`.
    pub fn new(name: impl Into<String>, groups: &[&str]) -> Self {
        UserInfo {
            name: name.into(),
            uid: String::new(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    /// `system:anonymous` in `system:unauthenticated`, for requests without credentials.
    pub fn anonymous() -> Self {
        UserInfo::new(ANONYMOUS_USER, &[UNAUTHENTICATED_GROUP])
    }

    /// Whether this is the anonymous user.
    pub fn is_anonymous(&self) -> bool {
        self.name == ANONYMOUS_USER
    }

    /// Whether the user is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// A failure to set up authentication or to authenticate a request.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The static token file could not be read.
    #[error("failed to read the token file {}", path.display())]
    ReadTokenFile {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A record of the static token file is malformed.
    #[error("token file {} record {record}: {problem}", path.display())]
    TokenFile {
        /// The token file.
        path: PathBuf,
        /// The 1-based record number.
        record: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// The request's bearer token is not known.
    #[error("invalid bearer token")]
    InvalidToken,
}

/// Validates bearer tokens other than the static ones, e.g. service-account
/// JWTs; `None` when the token is not one it knows.
pub trait TokenAuthenticator: Send + Sync {
    /// The user `token` belongs to, if it is valid.
    fn authenticate_token(&self, token: &str) -> Option<UserInfo>;
}

/// Authenticates requests by client certificate or bearer token.
#[derive(Default)]
pub struct Authenticator {
    tokens: HashMap<String, UserInfo>,
    token_authenticators: Vec<Box<dyn TokenAuthenticator>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens are secrets: only count them.
        f.debug_struct("Authenticator")
            .field("tokens", &self.tokens.len())
            .field("token_authenticators", &self.token_authenticators.len())
            .finish()
    }
}

impl Authenticator {
    /// An authenticator with the tokens of `token_file`, upstream's static
    /// token CSV (`token,user,uid,"group1,group2"`; the groups column is
    /// optional, further columns are ignored, empty tokens skipped).
    pub fn new(token_file: Option<&Path>) -> Result<Authenticator, AuthError> {
        let mut authenticator = Authenticator::default();
        if let Some(path) = token_file {
            let text =
                std::fs::read_to_string(path).map_err(|source| AuthError::ReadTokenFile {
                    path: path.to_path_buf(),
                    source,
                })?;
            for (token, user) in
                parse_token_file(&text).map_err(|(record, problem)| AuthError::TokenFile {
                    path: path.to_path_buf(),
                    record,
                    problem,
                })?
            {
                if authenticator.tokens.insert(token, user).is_some() {
                    tracing::warn!(path = %path.display(), "duplicate token in the token file, the last one wins");
                }
            }
        }
        Ok(authenticator)
    }

    /// Add a bearer token at runtime (e.g. the server's generated admin token).
    pub fn add_token(&mut self, token: &str, user: UserInfo) {
        self.tokens.insert(token.to_string(), user);
    }

    /// Add a validator for bearer tokens that are not static, e.g. the
    /// token controller's service-account tokens; consulted in order after
    /// the static tokens.
    pub fn add_token_authenticator(&mut self, authenticator: Box<dyn TokenAuthenticator>) {
        self.token_authenticators.push(authenticator);
    }

    /// The user of a request: from the peer's verified client certificate
    /// (CN → name, O → groups) or the `Authorization: Bearer` token (or the
    /// websocket bearer subprotocol). `Ok(None)` when the request carries
    /// neither (anonymous); `Err` for a token nobody knows. Authenticated
    /// users get the group `system:authenticated` added.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: Option<&PeerCertificates>,
    ) -> Result<Option<UserInfo>, AuthError> {
        let user = match peer.and_then(user_from_certificate) {
            Some(user) => Some(user),
            None => match bearer_token(headers) {
                Some(token) => Some(
                    self.authenticate_token(&token)
                        .ok_or(AuthError::InvalidToken)?,
                ),
                None => None,
            },
        };
        Ok(user.map(|mut user| {
            if !user.in_group(AUTHENTICATED_GROUP) {
                user.groups.push(AUTHENTICATED_GROUP.to_string());
            }
            user
        }))
    }

    fn authenticate_token(&self, token: &str) -> Option<UserInfo> {
        if let Some(user) = self.tokens.get(token) {
            return Some(user.clone());
        }
        self.token_authenticators
            .iter()
            .find_map(|authenticator| authenticator.authenticate_token(token))
    }
}

/// The user named by the leaf of a verified client certificate chain; none
/// when the chain is empty, unparseable or the common name is empty.
fn user_from_certificate(peer: &PeerCertificates) -> Option<UserInfo> {
    peer.user_with(user_from_chain).cloned()
}

fn user_from_chain(chain: &[rustls::pki_types::CertificateDer<'static>]) -> Option<UserInfo> {
    let leaf = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let (cn, groups) = crate::pki::subject_of(&cert);
    let name = cn.filter(|cn| !cn.is_empty())?;
    Some(UserInfo {
        name,
        uid: String::new(),
        groups,
    })
}

/// The bearer token of a request: `Authorization: Bearer <token>` (scheme
/// case-insensitive), else the websocket subprotocol
/// `base64url.bearer.authorization.k8s.io.<base64url token>`.
fn bearer_token(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let mut parts = value.trim().splitn(3, ' ');
        let scheme = parts.next().unwrap_or_default();
        if scheme.eq_ignore_ascii_case("bearer")
            && let Some(token) = parts.next().filter(|t| !t.is_empty())
        {
            return Some(token.to_string());
        }
    }
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|proto| proto.trim().strip_prefix(WEBSOCKET_TOKEN_PREFIX))
        .find_map(|encoded| {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .ok()?;
            String::from_utf8(bytes).ok().filter(|t| !t.is_empty())
        })
}

/// Parse upstream's static token CSV into (token, user) pairs; `Err` names
/// the 1-based record and the problem.
fn parse_token_file(text: &str) -> Result<Vec<(String, UserInfo)>, (usize, String)> {
    let mut users = Vec::new();
    for (index, record) in parse_csv(text)
        .map_err(|(record, problem)| (record, problem.to_string()))?
        .into_iter()
        .enumerate()
    {
        let number = index + 1;
        if record.len() < 3 {
            return Err((
                number,
                format!(
                    "must have at least 3 columns (token, user name, user uid), found {}",
                    record.len()
                ),
            ));
        }
        if record[0].is_empty() {
            tracing::warn!(record = number, "empty token in the token file, skipped");
            continue;
        }
        let groups = match record.get(3) {
            Some(groups) => groups.split(',').map(str::to_string).collect(),
            None => Vec::new(),
        };
        users.push((
            record[0].clone(),
            UserInfo {
                name: record[1].clone(),
                uid: record[2].clone(),
                groups,
            },
        ));
    }
    Ok(users)
}

/// RFC 4180 records as Go's `encoding/csv` reads them: comma-separated,
/// fields optionally double-quoted (`""` inside quotes is a quote, quoted
/// fields may span lines), blank lines skipped, `\r\n` accepted.
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>, (usize, &'static str)> {
    let mut records = Vec::new();
    let mut record: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    // Whether the current record has any content (a blank line has none).
    let mut started = false;
    let mut in_quotes = false;
    // Whether the current field was quoted and its closing quote seen.
    let mut closed_quote = false;
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    in_quotes = false;
                    closed_quote = true;
                }
            } else {
                field.push(c);
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !closed_quote => {
                in_quotes = true;
                started = true;
            }
            '"' => return Err((records.len() + 1, "bare \" in non-quoted field")),
            ',' => {
                record.push(std::mem::take(&mut field));
                closed_quote = false;
                started = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                if started || !field.is_empty() {
                    record.push(std::mem::take(&mut field));
                    records.push(std::mem::take(&mut record));
                }
                closed_quote = false;
                started = false;
            }
            _ if closed_quote => {
                return Err((records.len() + 1, "extraneous text after a quoted field"));
            }
            _ => {
                field.push(c);
                started = true;
            }
        }
    }
    if in_quotes {
        return Err((records.len() + 1, "unterminated quoted field"));
    }
    if started || !field.is_empty() {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

/// What a request does, as the authorizer sees it (upstream's `RequestInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RequestAttributes {
    /// Whether this is a request for an API resource (else a non-resource path).
    pub resource_request: bool,
    /// For resource requests one of get, list, watch, create, update,
    /// patch, delete, deletecollection (or proxy); for non-resource
    /// requests the lowercase HTTP method.
    pub verb: String,
    /// The API group, empty for the core group.
    pub api_group: String,
    /// The API version, e.g. `v1`.
    pub api_version: String,
    /// The resource's plural, e.g. `pods`.
    pub resource: String,
    /// The subresource, e.g. `status`.
    pub subresource: String,
    /// The namespace, empty for cluster-scoped requests.
    pub namespace: String,
    /// The object's name, empty for collections.
    pub name: String,
    /// The request path.
    pub path: String,
}

impl RequestAttributes {
    /// Describe a request by `method` and `uri` with upstream's rules:
    /// `/api/v1/namespaces/ns/pods/name/status`, `/apis/apps/v1/...`,
    /// `/api/v1/watch/...`; `GET` of a collection is `list` (`watch` with
    /// `?watch=true`), `DELETE` of a collection is `deletecollection`; a
    /// list or watch with `fieldSelector=metadata.name=x` names `x`.
    pub fn from_request(method: &Method, uri: &Uri) -> Self {
        let path = uri.path();
        let mut attrs = RequestAttributes {
            verb: method.as_str().to_ascii_lowercase(),
            path: path.to_string(),
            ..Default::default()
        };
        let parts: Vec<&str> = {
            let trimmed = path.trim_matches('/');
            if trimmed.is_empty() {
                Vec::new()
            } else {
                trimmed.split('/').collect()
            }
        };
        if parts.len() < 3 || !(parts[0] == "api" || parts[0] == "apis") {
            return attrs;
        }
        let mut rest = &parts[1..];
        if parts[0] == "apis" {
            if rest.len() < 3 {
                return attrs;
            }
            attrs.api_group = rest[0].to_string();
            rest = &rest[1..];
        }
        attrs.resource_request = true;
        attrs.api_version = rest[0].to_string();
        rest = &rest[1..];

        if rest[0] == "watch" || rest[0] == "proxy" {
            if rest.len() < 2 {
                // Upstream fails here; the handler will answer 404.
                return attrs;
            }
            attrs.verb = rest[0].to_string();
            rest = &rest[1..];
        } else {
            attrs.verb = match *method {
                Method::POST => "create",
                Method::GET | Method::HEAD => "get",
                Method::PUT => "update",
                Method::PATCH => "patch",
                Method::DELETE => "delete",
                _ => "",
            }
            .to_string();
        }

        if rest[0] == "namespaces" && rest.len() > 1 {
            attrs.namespace = rest[1].to_string();
            // A further step that is not a namespace subresource is a
            // resource of its own inside the namespace.
            if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
                rest = &rest[2..];
            }
        }

        if rest.len() >= 3 && attrs.verb != "proxy" {
            attrs.subresource = rest[2].to_string();
        }
        if rest.len() >= 2 {
            attrs.name = rest[1].to_string();
        }
        attrs.resource = rest[0].to_string();

        let query = || {
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
                .map(|q| q.0)
                .unwrap_or_default()
        };
        if attrs.name.is_empty() && attrs.verb == "get" {
            let watch = query()
                .into_iter()
                .find(|(k, _)| k == "watch")
                .map(|(_, v)| v);
            attrs.verb = match watch.map(|v| v.to_ascii_lowercase()) {
                Some(v) if v != "false" && v != "0" => "watch",
                _ => "list",
            }
            .to_string();
        }
        if attrs.name.is_empty() && attrs.verb == "delete" {
            attrs.verb = "deletecollection".to_string();
        }
        if attrs.name.is_empty() && (attrs.verb == "list" || attrs.verb == "watch") {
            let selector = query()
                .into_iter()
                .find(|(k, _)| k == "fieldSelector")
                .map(|(_, v)| v);
            if let Some(name) = selector.as_deref().and_then(exact_name) {
                attrs.name = name;
            }
        }
        attrs
    }

    /// The resource with its subresource, e.g. `pods/status`.
    pub fn qualified_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// The name a field selector requires exactly (`metadata.name=x` or
/// `metadata.name==x`), if any.
fn exact_name(selector: &str) -> Option<String> {
    selector.split(',').find_map(|term| {
        let rest = term.trim().strip_prefix("metadata.name")?.trim_start();
        let value = rest.strip_prefix("==").or_else(|| rest.strip_prefix('='))?;
        Some(value.trim().to_string()).filter(|v| !v.is_empty())
    })
}

/// An authorizer's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The request may proceed.
    Allow,
    /// The request is refused, for the given reason (may be empty).
    Deny(String),
    /// The authorizer does not decide; treated as a refusal.
    NoOpinion,
}

/// The hook an RBAC authorizer implements.
pub trait Authorizer: Send + Sync {
    /// Whether `user` may do what `attrs` describe.
    fn authorize(&self, user: &UserInfo, attrs: &RequestAttributes) -> Decision;
}

/// Allows every authenticated user (the default until RBAC lands);
/// anonymous users only get the public non-resource paths ([`PUBLIC_PATHS`]),
/// like upstream's `system:public-info-viewer`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAuthenticated;

impl Authorizer for AllowAuthenticated {
    fn authorize(&self, user: &UserInfo, attrs: &RequestAttributes) -> Decision {
        if !user.is_anonymous() && user.in_group(AUTHENTICATED_GROUP) {
            return Decision::Allow;
        }
        if !attrs.resource_request
            && (attrs.verb == "get" || attrs.verb == "head")
            && PUBLIC_PATHS.contains(&attrs.path.as_str())
        {
            return Decision::Allow;
        }
        Decision::NoOpinion
    }
}

/// What [`middleware`] needs: who the user is and what they may do.
pub struct AuthState {
    /// Authenticates each request.
    pub authenticator: Authenticator,
    /// Decides whether the user may do what the request asks.
    pub authorizer: Box<dyn Authorizer>,
}

/// Upstream's forbidden message, e.g. `pods is forbidden: User "x" cannot
/// list resource "pods" in API group "" in the namespace "default"`.
pub fn forbidden(user: &UserInfo, attrs: &RequestAttributes, reason: &str) -> ApiError {
    let mut message = if !attrs.resource_request {
        format!(
            "User {:?} cannot {} path {:?}",
            user.name, attrs.verb, attrs.path
        )
    } else if !attrs.namespace.is_empty() {
        format!(
            "User {:?} cannot {} resource {:?} in API group {:?} in the namespace {:?}",
            user.name,
            attrs.verb,
            attrs.qualified_resource(),
            attrs.api_group,
            attrs.namespace
        )
    } else {
        format!(
            "User {:?} cannot {} resource {:?} in API group {:?} at the cluster scope",
            user.name,
            attrs.verb,
            attrs.qualified_resource(),
            attrs.api_group
        )
    };
    if !reason.is_empty() {
        message = format!("{message}: {reason}");
    }
    if !attrs.resource_request || attrs.resource.is_empty() {
        return ApiError::forbidden(format!("forbidden: {message}"));
    }
    let qualified = if attrs.api_group.is_empty() {
        attrs.resource.clone()
    } else {
        format!("{}.{}", attrs.resource, attrs.api_group)
    };
    let message = if attrs.name.is_empty() {
        format!("{qualified} is forbidden: {message}")
    } else {
        format!("{qualified} {:?} is forbidden: {message}", attrs.name)
    };
    ApiError::forbidden(message).with_details(&attrs.api_group, &attrs.resource, &attrs.name)
}

/// axum middleware (mount with `axum::middleware::from_fn_with_state`):
/// authenticates the request (401 `Unauthorized` for an invalid token or an
/// anonymous request the authorizer does not allow), asks the authorizer
/// (403 `Forbidden` with upstream's message) and inserts the [`UserInfo`]
/// (anonymous included) and the [`RequestAttributes`] into the request's
/// extensions.
pub async fn middleware(
    State(state): State<Arc<AuthState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request.extensions().get::<PeerCertificates>();
    let user = match state.authenticator.authenticate(request.headers(), peer) {
        Ok(user) => user,
        Err(err) => {
            tracing::debug!(error = %err, path = request.uri().path(), "authentication failed");
            return ApiError::unauthorized("Unauthorized").into_response();
        }
    };
    let attrs = RequestAttributes::from_request(request.method(), request.uri());
    let user = match user {
        Some(user) => match state.authorizer.authorize(&user, &attrs) {
            Decision::Allow => user,
            Decision::Deny(reason) => return forbidden(&user, &attrs, &reason).into_response(),
            Decision::NoOpinion => return forbidden(&user, &attrs, "").into_response(),
        },
        None => {
            let anonymous = UserInfo::anonymous();
            match state.authorizer.authorize(&anonymous, &attrs) {
                Decision::Allow => anonymous,
                Decision::Deny(_) | Decision::NoOpinion => {
                    return ApiError::unauthorized("Unauthorized").into_response();
                }
            }
        }
    };
    request.extensions_mut().insert(user);
    request.extensions_mut().insert(attrs);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn attrs(method: Method, uri: &str) -> RequestAttributes {
        RequestAttributes::from_request(&method, &uri.parse::<Uri>().expect("uri parses"))
    }

    #[test]
    fn parses_the_static_token_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens.csv");
        std::fs::write(
            &path,
            "t1,alice,uid-1,\"system:masters,devs\"\r\n\n,empty,uid-0\nt2,bob,uid-2\n\"t,3\",\"carol \"\"c\"\"\",uid-3,ops,extra\n",
        )
        .expect("write token file");
        let auth = Authenticator::new(Some(&path)).expect("token file parses");
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            "Bearer t1".parse().expect("header"),
        );
        let alice = auth
            .authenticate(&headers, None)
            .expect("t1 is valid")
            .expect("a user");
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.uid, "uid-1");
        assert_eq!(
            alice.groups,
            vec!["system:masters", "devs", AUTHENTICATED_GROUP]
        );

        headers.insert(
            http::header::AUTHORIZATION,
            "bearer t2".parse().expect("header"),
        );
        let bob = auth
            .authenticate(&headers, None)
            .expect("t2 is valid")
            .expect("a user");
        assert_eq!(
            (bob.name.as_str(), bob.groups.as_slice()),
            ("bob", &[AUTHENTICATED_GROUP.to_string()][..])
        );

        headers.insert(
            http::header::AUTHORIZATION,
            "Bearer t,3".parse().expect("header"),
        );
        let carol = auth
            .authenticate(&headers, None)
            .expect("t,3 is valid")
            .expect("a user");
        assert_eq!(carol.name, "carol \"c\"");
        assert_eq!(carol.groups, vec!["ops", AUTHENTICATED_GROUP]);

        std::fs::write(&path, "t1,alice\n").expect("write token file");
        let err = Authenticator::new(Some(&path)).expect_err("two columns are refused");
        assert!(err.to_string().contains("record 1"), "{err}");
        std::fs::write(&path, "t1,alice,uid,\"open\n").expect("write token file");
        assert!(
            Authenticator::new(Some(&path)).is_err(),
            "an unterminated quote is refused"
        );
        assert!(Authenticator::new(Some(&dir.path().join("missing"))).is_err());
    }

    #[test]
    fn bearer_tokens_and_anonymous_requests() {
        let mut auth = Authenticator::new(None).expect("no token file");
        auth.add_token("secret", UserInfo::new("admin", &["system:masters"]));
        let mut headers = HeaderMap::new();
        assert_eq!(
            auth.authenticate(&headers, None)
                .expect("anonymous is fine"),
            None
        );

        headers.insert(
            http::header::AUTHORIZATION,
            "Basic Zm9vOmJhcg==".parse().expect("header"),
        );
        assert_eq!(
            auth.authenticate(&headers, None)
                .expect("other schemes are ignored"),
            None
        );

        headers.insert(
            http::header::AUTHORIZATION,
            "Bearer nope".parse().expect("header"),
        );
        assert!(matches!(
            auth.authenticate(&headers, None),
            Err(AuthError::InvalidToken)
        ));

        let mut headers = HeaderMap::new();
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("secret");
        headers.insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            format!("v5.channel.k8s.io, {WEBSOCKET_TOKEN_PREFIX}{encoded}")
                .parse()
                .expect("header"),
        );
        let user = auth
            .authenticate(&headers, None)
            .expect("valid")
            .expect("a user");
        assert_eq!(user.groups, vec!["system:masters", AUTHENTICATED_GROUP]);

        struct Sa;
        impl TokenAuthenticator for Sa {
            fn authenticate_token(&self, token: &str) -> Option<UserInfo> {
                (token == "jwt").then(|| UserInfo::new("system:serviceaccount:default:sa", &[]))
            }
        }
        auth.add_token_authenticator(Box::new(Sa));
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            "Bearer jwt".parse().expect("header"),
        );
        let sa = auth
            .authenticate(&headers, None)
            .expect("valid")
            .expect("a user");
        assert_eq!(sa.name, "system:serviceaccount:default:sa");
    }

    #[test]
    fn client_certificates_name_the_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = crate::pki::Pki::load_or_create(dir.path(), &[]).expect("pki");
        let (cert, _) = pki
            .issue_client_cert("jane", &["devs", "ops"])
            .expect("issue");
        let der = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).expect("pem")
        };
        let peer = PeerCertificates::new(vec![der]);
        let auth = Authenticator::new(None).expect("authenticator");
        // A certificate wins over a bad token, as upstream's union authenticator does.
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            "Bearer nope".parse().expect("header"),
        );
        let user = auth
            .authenticate(&headers, Some(&peer))
            .expect("valid")
            .expect("a user");
        assert_eq!(user.name, "jane");
        assert_eq!(user.groups, vec!["devs", "ops", AUTHENTICATED_GROUP]);
    }

    #[test]
    fn request_attributes_follow_upstream_rules() {
        let a = attrs(Method::GET, "/api/v1/namespaces/default/pods");
        assert_eq!(
            (
                a.verb.as_str(),
                a.api_group.as_str(),
                a.api_version.as_str(),
                a.resource.as_str(),
                a.namespace.as_str()
            ),
            ("list", "", "v1", "pods", "default")
        );
        assert!(a.resource_request);
        let a = attrs(
            Method::GET,
            "/api/v1/namespaces/default/pods?watch=true&resourceVersion=5",
        );
        assert_eq!(a.verb, "watch");
        let a = attrs(Method::GET, "/api/v1/namespaces/default/pods?watch=0");
        assert_eq!(a.verb, "list");
        let a = attrs(Method::PUT, "/api/v1/namespaces/ns/pods/web/status");
        assert_eq!(
            (
                a.verb.as_str(),
                a.resource.as_str(),
                a.name.as_str(),
                a.subresource.as_str()
            ),
            ("update", "pods", "web", "status")
        );
        let a = attrs(
            Method::PATCH,
            "/apis/apps/v1/namespaces/ns/deployments/web/scale",
        );
        assert_eq!(
            (
                a.verb.as_str(),
                a.api_group.as_str(),
                a.resource.as_str(),
                a.subresource.as_str()
            ),
            ("patch", "apps", "deployments", "scale")
        );
        let a = attrs(Method::DELETE, "/apis/apps/v1/namespaces/ns/deployments");
        assert_eq!(a.verb, "deletecollection");
        let a = attrs(Method::DELETE, "/api/v1/nodes/n1");
        assert_eq!(
            (
                a.verb.as_str(),
                a.resource.as_str(),
                a.name.as_str(),
                a.namespace.as_str()
            ),
            ("delete", "nodes", "n1", "")
        );
        let a = attrs(Method::GET, "/api/v1/namespaces/kube-system");
        assert_eq!(
            (
                a.verb.as_str(),
                a.resource.as_str(),
                a.name.as_str(),
                a.namespace.as_str()
            ),
            ("get", "namespaces", "kube-system", "kube-system")
        );
        let a = attrs(Method::PUT, "/api/v1/namespaces/ns/finalize");
        assert_eq!(
            (a.resource.as_str(), a.name.as_str(), a.subresource.as_str()),
            ("namespaces", "ns", "finalize")
        );
        let a = attrs(Method::GET, "/api/v1/watch/namespaces/ns/pods");
        assert_eq!(
            (a.verb.as_str(), a.resource.as_str(), a.namespace.as_str()),
            ("watch", "pods", "ns")
        );
        let a = attrs(Method::POST, "/api/v1/namespaces/ns/pods");
        assert_eq!(a.verb, "create");
        let a = attrs(
            Method::GET,
            "/api/v1/namespaces/ns/pods?fieldSelector=metadata.name%3Dweb",
        );
        assert_eq!((a.verb.as_str(), a.name.as_str()), ("list", "web"));
        for path in [
            "/api",
            "/api/v1",
            "/apis",
            "/apis/apps",
            "/apis/apps/v1",
            "/healthz",
            "/openapi/v3",
        ] {
            let a = attrs(Method::GET, path);
            assert!(!a.resource_request, "{path} is a non-resource path");
            assert_eq!(a.verb, "get");
            assert_eq!(a.path, path);
        }
    }

    #[test]
    fn forbidden_messages_match_upstream() {
        let user = UserInfo::new("x", &[]);
        let err = forbidden(
            &user,
            &attrs(Method::GET, "/api/v1/namespaces/default/pods"),
            "",
        );
        assert_eq!(
            err.message,
            "pods is forbidden: User \"x\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        );
        assert_eq!(err.code, 403);
        let err = forbidden(&user, &attrs(Method::GET, "/apis/apps/v1/deployments"), "");
        assert_eq!(
            err.message,
            "deployments.apps is forbidden: User \"x\" cannot list resource \"deployments\" in API group \"apps\" at the cluster scope"
        );
        let err = forbidden(
            &user,
            &attrs(Method::PUT, "/api/v1/namespaces/ns/pods/web/status"),
            "no way",
        );
        assert_eq!(
            err.message,
            "pods \"web\" is forbidden: User \"x\" cannot update resource \"pods/status\" in API group \"\" in the namespace \"ns\": no way"
        );
        assert_eq!(err.details.name.as_deref(), Some("web"));
        let err = forbidden(&user, &attrs(Method::GET, "/metrics"), "");
        assert_eq!(
            err.message,
            "forbidden: User \"x\" cannot get path \"/metrics\""
        );
    }

    #[test]
    fn allow_authenticated_decisions() {
        let anonymous = UserInfo::anonymous();
        let mut user = UserInfo::new("u", &[]);
        assert_eq!(
            AllowAuthenticated.authorize(&user, &attrs(Method::GET, "/api/v1/pods")),
            Decision::NoOpinion
        );
        user.groups.push(AUTHENTICATED_GROUP.to_string());
        assert_eq!(
            AllowAuthenticated.authorize(&user, &attrs(Method::GET, "/api/v1/pods")),
            Decision::Allow
        );
        for path in ["/healthz", "/livez", "/readyz", "/version"] {
            assert_eq!(
                AllowAuthenticated.authorize(&anonymous, &attrs(Method::GET, path)),
                Decision::Allow,
                "{path}"
            );
        }
        assert_eq!(
            AllowAuthenticated.authorize(&anonymous, &attrs(Method::POST, "/healthz")),
            Decision::NoOpinion
        );
        assert_eq!(
            AllowAuthenticated.authorize(&anonymous, &attrs(Method::GET, "/api")),
            Decision::NoOpinion
        );
        assert_eq!(
            AllowAuthenticated.authorize(&anonymous, &attrs(Method::GET, "/api/v1/pods")),
            Decision::NoOpinion
        );
    }

    struct DenyAll;
    impl Authorizer for DenyAll {
        fn authorize(&self, user: &UserInfo, _: &RequestAttributes) -> Decision {
            if user.is_anonymous() {
                Decision::NoOpinion
            } else {
                Decision::Deny(String::new())
            }
        }
    }

    async fn call(app: &Router, uri: &str, token: Option<&str>) -> (u16, serde_json::Value) {
        let mut request = http::Request::get(uri);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::json!(String::from_utf8_lossy(&bytes)));
        (status, body)
    }

    fn app(authorizer: Box<dyn Authorizer>) -> Router {
        let mut authenticator = Authenticator::new(None).expect("authenticator");
        authenticator.add_token("good", UserInfo::new("tok", &[]));
        let state = Arc::new(AuthState {
            authenticator,
            authorizer,
        });
        let whoami = |axum::Extension(user): axum::Extension<UserInfo>| async move { user.name };
        Router::new()
            .route("/healthz", get(whoami))
            .route("/api/v1/namespaces/{ns}/pods", get(whoami))
            .layer(axum::middleware::from_fn_with_state(state, middleware))
    }

    #[tokio::test]
    async fn middleware_answers_401_and_403() {
        let app = app(Box::new(AllowAuthenticated));
        assert_eq!(
            call(&app, "/healthz", None).await,
            (200, serde_json::json!("system:anonymous"))
        );
        assert_eq!(
            call(&app, "/api/v1/namespaces/default/pods", Some("good")).await,
            (200, serde_json::json!("tok"))
        );
        let (code, status) = call(&app, "/api/v1/namespaces/default/pods", None).await;
        assert_eq!(code, 401);
        assert_eq!(status["reason"], "Unauthorized");
        assert_eq!(status["kind"], "Status");
        let (code, _) = call(&app, "/healthz", Some("bad")).await;
        assert_eq!(code, 401, "a bad token is refused even on public paths");

        let app = self::app(Box::new(DenyAll));
        let (code, status) = call(&app, "/api/v1/namespaces/default/pods", Some("good")).await;
        assert_eq!(code, 403);
        assert_eq!(status["reason"], "Forbidden");
        assert_eq!(
            status["message"],
            "pods is forbidden: User \"tok\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        );
        assert_eq!(status["details"]["kind"], "pods");
        let (code, _) = call(&app, "/healthz", None).await;
        assert_eq!(code, 401);
    }
}
