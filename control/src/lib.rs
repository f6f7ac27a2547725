//! skiff's control plane: a Kubernetes-compatible API server backed by etcd.
//!
//! The API server keeps every object as Kubernetes JSON in etcd under
//! `/registry/<group>/<resource>/<namespace>/<name>`; resourceVersion is the
//! etcd revision. See ARCHITECTURE.md for the map of modules.

pub mod admission;
pub mod api;
pub mod apply;
pub mod auth;
pub mod cli;
pub mod client;
pub mod controllers;
pub mod discovery;
pub mod etcd;
pub mod events;
pub mod informer;
pub mod leader;
pub mod meta;
pub mod metrics;
pub mod nodeproxy;
pub mod nscache;
pub mod openapi;
pub mod patch;
pub mod pki;
pub mod protobuf;
pub mod rawjson;
pub mod registry;
pub mod scheduler;
pub mod selector;
pub mod serve;
pub mod server;
pub mod status;
pub mod storage;
pub mod table;
#[cfg(test)]
mod testing;
pub mod trimmed;
pub mod watchcache;
