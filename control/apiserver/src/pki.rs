//! The API server's certificates: a self-signed CA, the serving certificate
//! and the admin client certificate, kept under the server's data dir.
//!
//! [`Pki::load_or_create`] is idempotent: what is on disk and still valid is
//! reused (so clients keep trusting the same CA across restarts); what is
//! missing, unparseable, expiring, signed by another CA or — for the serving
//! certificate — issued for another set of names is (re)generated. The CA
//! also signs client certificates ([`Pki::issue_client_cert`]), whose common
//! name and organizations the authenticator maps to user name and groups,
//! as upstream's x509 authenticator does.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};

/// The CA's common name.
pub const CA_NAME: &str = "skiff-ca";
/// The admin client certificate's common name (the user name).
pub const ADMIN_USER: &str = "skiff-admin";
/// The admin client certificate's organization (the group with every right).
pub const ADMIN_GROUP: &str = "system:masters";
/// The serving certificate's common name, as upstream's kubeadm names it.
const SERVING_NAME: &str = "kube-apiserver";

/// The names the serving certificate always carries.
pub const DEFAULT_SANS: &[&str] = &[
    "localhost",
    "127.0.0.1",
    "::1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// How long the CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// How long serving and client certificates are valid.
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Certificates expiring sooner than this are regenerated on load.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Backdating of `notBefore`, for clocks slightly behind ours.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// A failure to load, create or use the certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file or directory could not be read or written.
    #[error("failed to access {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// rcgen failed to generate a key or sign a certificate.
    #[error("failed to generate the {what}")]
    Generate {
        /// What was being generated, e.g. `serving certificate`.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A subject alternative name is neither an IP address nor a DNS name.
    #[error("invalid subject alternative name {name:?}")]
    InvalidSan {
        /// The name as given.
        name: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A PEM document could not be decoded.
    #[error("failed to decode the {what} pem")]
    Pem {
        /// What the PEM holds, e.g. `ca certificate`.
        what: &'static str,
        /// The decoding error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rcgen keeps one value per attribute type, so a subject carries at
    /// most two organizations (`O` and `O` spelled as a custom attribute).
    #[error("a client certificate carries at most 2 organizations, got {count}")]
    TooManyOrganizations {
        /// How many were asked for.
        count: usize,
    },
    /// rustls refused the certificates or the configuration.
    #[error("failed to build the tls server configuration")]
    Tls {
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// The client certificate verifier could not be built.
    #[error("failed to build the client certificate verifier")]
    Verifier {
        /// rustls' error.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The kubeconfig could not be serialized.
    #[error("failed to serialize the kubeconfig")]
    Kubeconfig {
        /// serde_yaml's error.
        #[source]
        source: serde_yaml::Error,
    },
}

/// The API server's CA, serving certificate and admin client certificate,
/// as PEM, together with where they live.
#[derive(Clone)]
pub struct Pki {
    dir: PathBuf,
    ca: Pair,
    serving: Pair,
    admin: Pair,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of logs.
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// A certificate and its private key, as PEM.
#[derive(Clone)]
struct Pair {
    cert: String,
    key: String,
}

impl Pki {
    /// Load or create under `dir`: `ca.crt`/`ca.key` (self-signed CA
    /// "skiff-ca", 10 years), `apiserver.crt`/`apiserver.key` (serving
    /// certificate signed by the CA for [`DEFAULT_SANS`] plus `extra_sans`,
    /// DNS names or IP addresses; regenerated when that set changed) and
    /// `admin.crt`/`admin.key` (client certificate CN "skiff-admin",
    /// O "system:masters"). Keys are written with mode 0600.
    pub fn load_or_create(dir: &Path, extra_sans: &[String]) -> Result<Pki, PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let sans = san_set(extra_sans);
        let now = SystemTime::now();

        let (ca, ca_created) = match load_pair(dir, "ca") {
            Some(pair) if ca_is_valid(&pair, now) => (pair, false),
            found => {
                if found.is_some() {
                    tracing::warn!(dir = %dir.display(), "the CA is invalid or expiring, creating a new one");
                }
                let pair = create_ca(now)?;
                store_pair(dir, "ca", &pair)?;
                (pair, true)
            }
        };
        let ca_key_id = key_id_of(&ca.cert);

        let serving = match load_pair(dir, "apiserver") {
            Some(pair)
                if !ca_created
                    && leaf_is_valid(&pair, ca_key_id.as_deref(), now, |cert| {
                        cert_sans(cert).is_some_and(|found| found == sans)
                    }) =>
            {
                pair
            }
            _ => {
                let pair = create_serving(&ca, &sans, now)?;
                store_pair(dir, "apiserver", &pair)?;
                pair
            }
        };

        let admin = match load_pair(dir, "admin") {
            Some(pair)
                if !ca_created
                    && leaf_is_valid(&pair, ca_key_id.as_deref(), now, |cert| {
                        subject_of(cert)
                            == (Some(ADMIN_USER.to_string()), vec![ADMIN_GROUP.to_string()])
                    }) =>
            {
                pair
            }
            _ => {
                let pair = issue_client(&ca, ADMIN_USER, &[ADMIN_GROUP], now)?;
                store_pair(dir, "admin", &pair)?;
                pair
            }
        };

        Ok(Pki {
            dir: dir.to_path_buf(),
            ca,
            serving,
            admin,
        })
    }

    /// The directory the certificates live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of the CA certificate (`ca.crt`), for `--certificate-authority`.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The CA certificate as PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca.cert
    }

    /// The serving certificate and key as PEM.
    pub fn serving_cert(&self) -> (&str, &str) {
        (&self.serving.cert, &self.serving.key)
    }

    /// The admin client certificate and key PEMs.
    pub fn admin_cert(&self) -> (&str, &str) {
        (&self.admin.cert, &self.admin.key)
    }

    /// The rustls server configuration: the serving certificate; client
    /// certificates optional and, when sent, verified against the CA; ALPN
    /// `h2` and `http/1.1`. Uses the ring provider explicitly.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(parse_cert(&self.ca.cert, "ca certificate")?)
            .map_err(|source| PkiError::Tls { source })?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|source| PkiError::Verifier { source })?;
        let key = PrivateKeyDer::from_pem_slice(self.serving.key.as_bytes()).map_err(|source| {
            PkiError::Pem {
                what: "serving key",
                source,
            }
        })?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| PkiError::Tls { source })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![parse_cert(&self.serving.cert, "serving certificate")?],
                key,
            )
            .map_err(|source| PkiError::Tls { source })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Issue a client certificate for the common name `cn` (the user name)
    /// and `orgs` (the groups), signed by the CA: `(cert_pem, key_pem)`.
    pub fn issue_client_cert(&self, cn: &str, orgs: &[&str]) -> Result<(String, String), PkiError> {
        let pair = issue_client(&self.ca, cn, orgs, SystemTime::now())?;
        Ok((pair.cert, pair.key))
    }

    /// Issue a client certificate for the common name `cn` (the user name),
    /// signed by the CA, as DER: the identity of a daemon whose requests
    /// reach the API server in process, with no TLS handshake to present it
    /// (see [`crate::client::in_process`]).
    pub fn issue_client_identity(&self, cn: &str) -> Result<CertificateDer<'static>, PkiError> {
        let (cert, _key) = self.issue_client_cert(cn, &[])?;
        parse_cert(&cert, "client certificate")
    }
}

/// Write an admin kubeconfig to `path` (mode 0600, parent directories
/// created): cluster "skiff" at `server_url` trusting the CA, user
/// "skiff-admin" with the admin client certificate, context "skiff" current.
pub fn write_kubeconfig(path: &Path, server_url: &str, pki: &Pki) -> Result<(), PkiError> {
    let (cert, key) = pki.admin_cert();
    write_kubeconfig_for(path, server_url, pki, ADMIN_USER, cert, key)
}

fn write_kubeconfig_for(
    path: &Path,
    server_url: &str,
    pki: &Pki,
    user: &str,
    cert: &str,
    key: &str,
) -> Result<(), PkiError> {
    let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem.as_bytes());
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "skiff",
            "cluster": {
                "server": server_url,
                "certificate-authority-data": b64(pki.ca_pem()),
            },
        }],
        "users": [{
            "name": user,
            "user": {
                "client-certificate-data": b64(cert),
                "client-key-data": b64(key),
            },
        }],
        "contexts": [{
            "name": "skiff",
            "context": {"cluster": "skiff", "user": user},
        }],
        "current-context": "skiff",
        "preferences": {},
    });
    let yaml = serde_yaml::to_string(&config).map_err(|source| PkiError::Kubeconfig { source })?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| PkiError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    write_atomic(path, yaml.as_bytes(), 0o600)
}

fn parse_cert(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|source| PkiError::Pem { what, source })
}

/// The wanted SAN set, normalized (IPs in canonical form), with the defaults.
fn san_set(extra: &[String]) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for name in DEFAULT_SANS
        .iter()
        .copied()
        .chain(extra.iter().map(|s| s.trim()))
        .filter(|s| !s.is_empty())
    {
        let normalized = match name.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => name.to_ascii_lowercase(),
        };
        set.insert(normalized);
    }
    set
}

/// Set `notBefore` (backdated an hour) and `notAfter` (`now + validity`).
fn set_validity(params: &mut CertificateParams, now: SystemTime, validity: Duration) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    params.not_before = epoch + since.saturating_sub(BACKDATE);
    params.not_after = epoch + since + validity;
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn generate_key(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate().map_err(|source| PkiError::Generate {
        what: format!("{what} key"),
        source,
    })
}

fn create_ca(now: SystemTime) -> Result<Pair, PkiError> {
    let key = generate_key("ca")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    set_validity(&mut params, now, CA_VALIDITY);
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate {
            what: "ca certificate".to_string(),
            source,
        })?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Sign `params` (a leaf) with the CA under a fresh key.
fn sign_leaf(
    ca: &Pair,
    mut params: CertificateParams,
    now: SystemTime,
    what: &str,
) -> Result<Pair, PkiError> {
    let generate = |source| PkiError::Generate {
        what: what.to_string(),
        source,
    };
    let ca_key = KeyPair::from_pem(&ca.key).map_err(generate)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(generate)?;
    let key = generate_key(what)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    set_validity(&mut params, now, LEAF_VALIDITY);
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

fn create_serving(ca: &Pair, sans: &BTreeSet<String>, now: SystemTime) -> Result<Pair, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, SERVING_NAME);
    params.subject_alt_names = sans
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => name
                .as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|source| PkiError::InvalidSan {
                    name: name.clone(),
                    source,
                }),
        })
        .collect::<Result<_, _>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sign_leaf(ca, params, now, "serving certificate")
}

fn issue_client(ca: &Pair, cn: &str, orgs: &[&str], now: SystemTime) -> Result<Pair, PkiError> {
    if orgs.len() > 2 {
        return Err(PkiError::TooManyOrganizations { count: orgs.len() });
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    // rcgen keys the subject by attribute type; the second organization is
    // the same OID (2.5.4.10) spelled as a custom type, so both are written.
    for (i, org) in orgs.iter().enumerate() {
        let ty = if i == 0 {
            DnType::OrganizationName
        } else {
            DnType::CustomDnType(vec![2, 5, 4, 10])
        };
        params.distinguished_name.push(ty, *org);
    }
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    sign_leaf(ca, params, now, "client certificate")
}

fn load_pair(dir: &Path, name: &str) -> Option<Pair> {
    let cert = std::fs::read_to_string(dir.join(format!("{name}.crt"))).ok()?;
    let key = std::fs::read_to_string(dir.join(format!("{name}.key"))).ok()?;
    Some(Pair { cert, key })
}

fn store_pair(dir: &Path, name: &str, pair: &Pair) -> Result<(), PkiError> {
    // The key first: a crash in between leaves a certificate that does not
    // match its key, which the next load detects and regenerates.
    write_atomic(&dir.join(format!("{name}.key")), pair.key.as_bytes(), 0o600)?;
    write_atomic(
        &dir.join(format!("{name}.crt")),
        pair.cert.as_bytes(),
        0o644,
    )
}

/// Write `contents` to a temporary file with `mode` and rename it over `path`.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    // The umask may have narrowed the mode; never widened it, but set it exactly.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Decode the first certificate of `pem` as DER.
fn cert_der(pem: &str) -> Option<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes()).ok()
}

/// Whether `cert` is valid from now until at least [`RENEW_BEFORE`] from now.
fn in_validity(cert: &X509Certificate<'_>, now: SystemTime) -> bool {
    let now_secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let validity = cert.validity();
    validity.not_before.timestamp() <= now_secs + DAY.as_secs() as i64
        && validity.not_after.timestamp() > now_secs + RENEW_BEFORE.as_secs() as i64
}

/// Whether the private key of `pair` belongs to its certificate.
fn key_matches(pair: &Pair, cert: &X509Certificate<'_>) -> bool {
    KeyPair::from_pem(&pair.key)
        .is_ok_and(|key| key.public_key_raw() == cert.public_key().subject_public_key.data.as_ref())
}

fn ca_is_valid(pair: &Pair, now: SystemTime) -> bool {
    let Some(der) = cert_der(&pair.cert) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    cert.is_ca()
        && in_validity(&cert, now)
        && key_matches(pair, &cert)
        && subject_key_id(&cert).is_some()
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

fn authority_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|id| id.0.to_vec())
            }
            _ => None,
        })
}

/// The subject key identifier of the certificate in `pem`.
fn key_id_of(pem: &str) -> Option<Vec<u8>> {
    let der = cert_der(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    subject_key_id(&cert)
}

/// Whether a leaf is parseable, current, matches its key, was issued by the
/// CA with key id `ca_key_id` and passes `check`.
fn leaf_is_valid(
    pair: &Pair,
    ca_key_id: Option<&[u8]>,
    now: SystemTime,
    check: impl FnOnce(&X509Certificate<'_>) -> bool,
) -> bool {
    let Some(der) = cert_der(&pair.cert) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    ca_key_id.is_some()
        && authority_key_id(&cert).as_deref() == ca_key_id
        && in_validity(&cert, now)
        && key_matches(pair, &cert)
        && check(&cert)
}

/// The SANs of `cert`, normalized like [`san_set`].
fn cert_sans(cert: &X509Certificate<'_>) -> Option<BTreeSet<String>> {
    let ext = cert.subject_alternative_name().ok()??;
    let mut set = BTreeSet::new();
    for name in &ext.value.general_names {
        match name {
            GeneralName::DNSName(dns) => {
                set.insert(dns.to_ascii_lowercase());
            }
            GeneralName::IPAddress(bytes) => {
                let ip = match bytes.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?),
                    16 => IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?),
                    _ => return None,
                };
                set.insert(ip.to_string());
            }
            _ => {}
        }
    }
    Some(set)
}

/// The common name and organizations of a certificate's subject.
pub(crate) fn subject_of(cert: &X509Certificate<'_>) -> (Option<String>, Vec<String>) {
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|attr| attr.as_str().ok())
        .map(str::to_string);
    let orgs = subject
        .iter_organization()
        .filter_map(|attr| attr.as_str().ok())
        .map(str::to_string)
        .collect();
    (cn, orgs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate's DER, SANs and (common name, organizations).
    type Parsed = (Vec<u8>, BTreeSet<String>, (Option<String>, Vec<String>));

    fn parse(pem: &str) -> Parsed {
        let der = cert_der(pem).expect("certificate pem decodes");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("certificate parses");
        let sans = cert_sans(&cert).unwrap_or_default();
        let subject = subject_of(&cert);
        (der.to_vec(), sans, subject)
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("file exists")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn creates_then_reloads_the_same_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = vec!["10.96.0.1".to_string(), "skiff.example".to_string()];
        let first = Pki::load_or_create(dir.path(), &extra).expect("pki is created");

        let (_, sans, subject) = parse(first.serving_cert().0);
        for name in DEFAULT_SANS
            .iter()
            .chain(["10.96.0.1", "skiff.example"].iter())
        {
            assert!(
                sans.contains(*name),
                "serving certificate lacks SAN {name}: {sans:?}"
            );
        }
        assert_eq!(subject.0.as_deref(), Some(SERVING_NAME));
        let (_, _, ca_subject) = parse(first.ca_pem());
        assert_eq!(ca_subject.0.as_deref(), Some(CA_NAME));
        let (_, _, admin_subject) = parse(first.admin_cert().0);
        assert_eq!(
            admin_subject,
            (Some(ADMIN_USER.to_string()), vec![ADMIN_GROUP.to_string()])
        );

        for key in ["ca.key", "apiserver.key", "admin.key"] {
            assert_eq!(mode(&dir.path().join(key)), 0o600, "{key} mode");
        }
        assert!(dir.path().join("ca.crt").is_file());

        let second = Pki::load_or_create(dir.path(), &extra).expect("pki is reloaded");
        assert_eq!(first.ca_pem(), second.ca_pem(), "the CA survives a reload");
        assert_eq!(
            first.serving_cert(),
            second.serving_cert(),
            "an unchanged serving certificate is kept"
        );
        assert_eq!(
            first.admin_cert(),
            second.admin_cert(),
            "the admin certificate is kept"
        );
        second.server_config().expect("server config builds");
    }

    #[test]
    fn a_changed_san_set_regenerates_only_the_serving_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Pki::load_or_create(dir.path(), &["skiff.example".to_string()])
            .expect("pki is created");
        let second = Pki::load_or_create(dir.path(), &["192.168.1.10".to_string()])
            .expect("pki is reloaded");
        assert_eq!(first.ca_pem(), second.ca_pem());
        assert_eq!(first.admin_cert(), second.admin_cert());
        assert_ne!(first.serving_cert(), second.serving_cert());
        let (_, sans, _) = parse(second.serving_cert().0);
        assert!(sans.contains("192.168.1.10"), "{sans:?}");
        assert!(!sans.contains("skiff.example"), "{sans:?}");
    }

    #[test]
    fn broken_or_foreign_files_are_regenerated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Pki::load_or_create(dir.path(), &[]).expect("pki is created");
        std::fs::write(dir.path().join("admin.crt"), "garbage").expect("corrupt admin.crt");
        let second = Pki::load_or_create(dir.path(), &[]).expect("pki is reloaded");
        assert_eq!(first.ca_pem(), second.ca_pem());
        assert_ne!(first.admin_cert().0, second.admin_cert().0);
        assert!(second.admin_cert().0.contains("BEGIN CERTIFICATE"));

        // A serving certificate from another CA is replaced.
        let other = tempfile::tempdir().expect("tempdir");
        let foreign = Pki::load_or_create(other.path(), &[]).expect("other pki");
        std::fs::copy(
            other.path().join("apiserver.crt"),
            dir.path().join("apiserver.crt"),
        )
        .expect("copy crt");
        std::fs::copy(
            other.path().join("apiserver.key"),
            dir.path().join("apiserver.key"),
        )
        .expect("copy key");
        let third = Pki::load_or_create(dir.path(), &[]).expect("pki is reloaded");
        assert_eq!(third.ca_pem(), first.ca_pem());
        assert_ne!(third.serving_cert().0, foreign.serving_cert().0);

        // A new CA replaces every leaf.
        std::fs::remove_file(dir.path().join("ca.key")).expect("remove ca.key");
        let fourth = Pki::load_or_create(dir.path(), &[]).expect("pki is recreated");
        assert_ne!(fourth.ca_pem(), first.ca_pem());
        assert_ne!(fourth.admin_cert().0, third.admin_cert().0);
        assert_ne!(fourth.serving_cert().0, third.serving_cert().0);
    }

    #[test]
    fn issues_client_certificates_signed_by_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::load_or_create(dir.path(), &[]).expect("pki is created");
        let (cert, key) = pki
            .issue_client_cert("system:node:n1", &["system:nodes", "team-a"])
            .expect("certificate is issued");
        assert!(key.contains("PRIVATE KEY"));
        let der = cert_der(&cert).expect("pem decodes");
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("parses");
        assert_eq!(
            subject_of(&parsed),
            (
                Some("system:node:n1".to_string()),
                vec!["system:nodes".to_string(), "team-a".to_string()]
            )
        );
        assert_eq!(authority_key_id(&parsed), key_id_of(pki.ca_pem()));
        assert!(key_matches(
            &Pair {
                cert: cert.clone(),
                key
            },
            &parsed
        ));

        let err = pki
            .issue_client_cert("u", &["a", "b", "c"])
            .expect_err("three organizations are refused");
        assert!(
            matches!(err, PkiError::TooManyOrganizations { count: 3 }),
            "{err}"
        );
    }

    #[test]
    fn writes_a_kubeconfig_that_parses_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::load_or_create(&dir.path().join("pki"), &[]).expect("pki is created");
        let path = dir.path().join("home/.kube/config");
        write_kubeconfig(&path, "https://127.0.0.1:6443", &pki).expect("kubeconfig is written");
        assert_eq!(mode(&path), 0o600);
        let text = std::fs::read_to_string(&path).expect("kubeconfig is readable");
        let config: serde_json::Value = serde_yaml::from_str(&text).expect("kubeconfig is YAML");
        let decode = |value: &serde_json::Value| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value.as_str().expect("a string"))
                .expect("base64");
            String::from_utf8(bytes).expect("utf-8")
        };
        assert_eq!(config["current-context"], "skiff");
        assert_eq!(config["contexts"][0]["context"]["cluster"], "skiff");
        assert_eq!(config["contexts"][0]["context"]["user"], "skiff-admin");
        assert_eq!(
            config["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
        assert_eq!(
            decode(&config["clusters"][0]["cluster"]["certificate-authority-data"]),
            pki.ca_pem()
        );
        assert_eq!(
            decode(&config["users"][0]["user"]["client-certificate-data"]),
            pki.admin_cert().0
        );
        assert_eq!(
            decode(&config["users"][0]["user"]["client-key-data"]),
            pki.admin_cert().1
        );
    }
}
