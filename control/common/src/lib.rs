//! What more than one of skiff's components uses: the agent, the API
//! server, the scheduler, the controller manager and `skiffctl`. One
//! definition of each; nothing here serves requests or touches etcd or
//! bpffs.
//!
//! Layout:
//! - start-up: [`daemon`] (tracing, the shutdown signal, the API client),
//!   [`duration`] (flag durations);
//! - watching the API: [`watch`] (changes and keys), [`informer`] (one
//!   watch shared by every consumer in a process), [`trimmed`] (objects
//!   decoded without `managedFields`);
//! - acting on it: [`workqueue`] (the controllers' queue), [`leader`]
//!   (Lease elections), [`events`] (the Event recorder), [`error`] (cause
//!   chains and API codes);
//! - apimachinery's rules: [`quantity`], [`labels`] (selectors),
//!   [`validation`] (names and labels), [`qos`] (a pod's QoS class),
//!   [`node`] (what agents and controllers agree on about Nodes),
//!   [`resource`] (`kube::Resource` for lean decoded types),
//!   [`registry`] (the one table of served kinds: the API server routes by
//!   it, the namespace and garbage collectors walk it), [`service`] (what
//!   LoadBalancer IPAM and the agents read off a Service);
//! - `serviceaccount` (feature `serviceaccount`): token keys, signing and
//!   verification, for the API server and the token controller.

pub mod daemon;
pub mod duration;
pub mod error;
pub mod events;
pub mod informer;
pub mod labels;
pub mod leader;
pub mod node;
pub mod qos;
pub mod quantity;
pub mod registry;
pub mod resource;
pub mod service;
#[cfg(feature = "serviceaccount")]
pub mod serviceaccount;
pub mod trimmed;
pub mod validation;
pub mod watch;
pub mod workqueue;
