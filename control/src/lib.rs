//! `skiff-control`: skiff's control plane as one binary. Each daemon is a
//! crate of its own, and this one wires them: `apiserver`
//! (`skiff-apiserver`), `scheduler` (`skiff-scheduler`),
//! `controller-manager` (`skiff-controller-manager`), or [`all`] three in
//! one process; [`cli`] holds the command line. What they share is
//! `skiff-common`. See ARCHITECTURE.md for the crate graph.

pub mod all;
pub mod cli;
