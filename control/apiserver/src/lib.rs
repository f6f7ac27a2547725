//! skiff's API server: the Kubernetes REST API on etcd.
//!
//! Every object is kept as Kubernetes JSON in etcd under
//! `/registry/<group>/<resource>/<namespace>/<name>`; resourceVersion is the
//! etcd revision. Layout, from the socket inward:
//! - [`server`] starts it all (certificates, etcd, bootstrap objects,
//!   middleware, listener) and [`client`] hands daemons in the same process
//!   a client whose requests skip the socket; [`serve`] is the TLS accept
//!   loop, [`auth`] authentication and authorization, [`metrics`] `/metrics`;
//! - [`api`] the REST surface, one module per verb family; [`discovery`],
//!   [`openapi`] and [`table`] what kubectl reads besides objects;
//!   [`nodeproxy`] logs, exec and port-forward proxied to the agents;
//! - [`admission`] defaulting, validation and Service IP/port allocation;
//!   [`meta`] server-owned metadata; [`patch`] and [`apply`] the patch
//!   formats and managedFields; [`selector`] label and field selectors;
//!   [`protobuf`] protobuf request bodies; [`status`] errors as `Status`;
//! - [`storage`] etcd transactions and watches, [`watchcache`] one watch
//!   per resource shared by every client, [`nscache`] active namespaces,
//!   [`rawjson`] stored objects handled as text, [`etcd`] the child etcd.
//!
//! The table of served kinds is `skiff_common::registry`.

pub mod admission;
pub mod api;
pub mod apply;
pub mod auth;
pub mod cli;
pub mod client;
pub mod discovery;
pub mod etcd;
pub mod meta;
pub mod metrics;
pub mod nodeproxy;
pub mod nscache;
pub mod openapi;
pub mod patch;
pub mod pki;
pub mod protobuf;
pub mod rawjson;
pub mod selector;
pub mod serve;
pub mod server;
pub mod status;
pub mod storage;
pub mod table;
#[cfg(test)]
mod testing;
pub mod watchcache;
