//! Errors of the plugin and their CNI error codes.
//!
//! Every failure is a [`CniError`]; [`CniError::code`] gives the code of the CNI specification
//! (1–11, 50 for STATUS) or one of the plugin's own (100 and up, listed on each variant), and
//! [`CniError::to_json`] the error object printed on stdout.

use std::io;
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::ipam::IpamError;

/// Netlink operation failed (creating or deleting a link, address, route or neighbour).
pub const CODE_NETLINK: u32 = 100;
/// The pod CIDR has no free address left.
pub const CODE_POOL_EXHAUSTED: u32 = 101;
/// The interface to create already exists in the network namespace.
pub const CODE_INTERFACE_EXISTS: u32 = 102;
/// CHECK found the attachment different from what ADD made.
pub const CODE_CHECK_FAILED: u32 = 103;
/// A sysctl under /proc/sys could not be written or read.
pub const CODE_SYSCTL: u32 = 104;
/// Entering a network namespace failed.
pub const CODE_NETNS: u32 = 105;
/// GC could not remove everything stale (it went on past each failure).
pub const CODE_GC_INCOMPLETE: u32 = 106;

/// A failure of one plugin invocation.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// Code 1: the configuration asks for a CNI version this plugin does not speak.
    #[error("incompatible CNI version {version} (supported: {supported})")]
    IncompatibleVersion {
        /// The version asked for.
        version: String,
        /// The versions this plugin supports, comma separated.
        supported: String,
    },
    /// Code 4: a CNI_* environment variable is missing or malformed.
    #[error("invalid environment variable {variable}: {reason}")]
    InvalidEnv {
        /// The variable, e.g. `CNI_IFNAME`.
        variable: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Code 6: stdin is not a JSON network configuration.
    #[error("cannot decode the network configuration on stdin")]
    Decode {
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// Code 7: the network configuration is well-formed JSON but invalid.
    #[error("invalid network configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// Code 3: the container's network namespace does not exist.
    #[error("network namespace {path} of container {container_id} does not exist")]
    UnknownContainer {
        /// CNI_CONTAINERID.
        container_id: String,
        /// CNI_NETNS.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: io::Error,
    },
    /// Code 105: entering or leaving a network namespace failed.
    #[error("cannot enter network namespace {path}")]
    Netns {
        /// The namespace.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// Code 102: ADD found CNI_IFNAME already present in the namespace.
    #[error("interface {ifname} already exists in network namespace {netns}")]
    InterfaceExists {
        /// CNI_IFNAME.
        ifname: String,
        /// CNI_NETNS.
        netns: PathBuf,
    },
    /// Code 101 (pool exhausted) or 5 (I/O): the IPAM store failed.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// Code 100: a netlink request failed.
    #[error("netlink: cannot {action}")]
    Netlink {
        /// What was being done, e.g. `create veth skf0123456789a`.
        action: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Code 104: writing or reading a sysctl failed.
    #[error("cannot set sysctl {path} to {value}")]
    Sysctl {
        /// The file under /proc/sys.
        path: PathBuf,
        /// The value.
        value: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// Code 103: CHECK found the attachment not as ADD left it.
    #[error("check failed: {reason}")]
    CheckFailed {
        /// What differs.
        reason: String,
    },
    /// Code 50: STATUS found the plugin unable to serve ADD.
    #[error("plugin not available: {reason}")]
    NotAvailable {
        /// Why.
        reason: String,
    },
    /// Code 106: GC went through everything but some stale state could not be removed.
    #[error("garbage collection incomplete: {failures} failure(s), first: {first}")]
    GcIncomplete {
        /// How many removals failed.
        failures: usize,
        /// The first failure, as text.
        first: String,
    },
    /// Code 5: an I/O failure outside the IPAM store (e.g. writing stdout).
    #[error("i/o failure: {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
}

impl CniError {
    /// The CNI error code of this error.
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion { .. } => 1,
            CniError::UnknownContainer { .. } => 3,
            CniError::InvalidEnv { .. } => 4,
            CniError::Io { .. } => 5,
            CniError::Decode { .. } => 6,
            CniError::InvalidConfig { .. } => 7,
            CniError::NotAvailable { .. } => 50,
            CniError::Ipam(e) => e.code(),
            CniError::Netlink { source, .. } if is_busy(source) => 11,
            CniError::Netlink { .. } => CODE_NETLINK,
            CniError::InterfaceExists { .. } => CODE_INTERFACE_EXISTS,
            CniError::CheckFailed { .. } => CODE_CHECK_FAILED,
            CniError::Sysctl { .. } => CODE_SYSCTL,
            CniError::Netns { .. } => CODE_NETNS,
            CniError::GcIncomplete { .. } => CODE_GC_INCOMPLETE,
        }
    }

    /// The error object of the CNI specification: `msg` is this error, `details` the whole chain
    /// of causes.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut details = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            details.push_str(": ");
            details.push_str(&cause.to_string());
            source = cause.source();
        }
        json!({
            "cniVersion": cni_version,
            "code": self.code(),
            "msg": self.to_string(),
            "details": details,
        })
    }
}

/// Whether a netlink error is transient (EBUSY or EAGAIN), which the runtime may retry.
fn is_busy(err: &rtnetlink::Error) -> bool {
    matches!(err, rtnetlink::Error::NetlinkError(m)
        if matches!(m.raw_code().abs(), 11 | 16))
}

/// The errno of a netlink error, if the kernel sent one.
pub(crate) fn netlink_errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => Some(m.raw_code().abs()),
        _ => None,
    }
}
