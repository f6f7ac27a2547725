//! L2 announcement of LoadBalancer IPs: for each LoadBalancer Service this node can serve, the
//! agent runs for its Lease (`kube-system/skiff-l2-<namespace>-<name>`, upstream's leader
//! election), and the node that holds it answers ARP for the Service's ingress IPs on its
//! uplink (`skf_uplink_in`, from `SKF_L2ANN_V1`). When the holder's agent dies, its Lease
//! expires and another candidate takes over within the lease duration.
//!
//! A node is a candidate for a Service when it is in the race at all (its agent runs), and,
//! under `externalTrafficPolicy: Local`, when it has a ready local endpoint (as MetalLB's
//! `usableNodes`).

use std::collections::{BTreeSet, HashMap};

use skiff_common::leader::{ElectionTiming, LeaderElection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The Lease namespace.
pub const LEASE_NAMESPACE: &str = "kube-system";

/// The Lease name for the Service `namespace/name`.
pub fn lease_name(service_key: &str) -> String {
    let name = format!("skiff-l2-{}", service_key.replace('/', "-"));
    // A Lease name is a DNS subdomain: at most 253 bytes.
    name.chars().take(253).collect()
}

/// Whether this node holds (`true`) or lost (`false`) a Service's Lease.
pub type Held = (String, bool);

/// The elections this node takes part in.
pub struct Announcer {
    client: kube::Client,
    node: String,
    timing: ElectionTiming,
    running: HashMap<String, CancellationToken>,
    tx: mpsc::UnboundedSender<Held>,
    shutdown: CancellationToken,
}

impl Announcer {
    /// An announcer for `node`; its elections report to the returned receiver.
    pub fn new(
        client: kube::Client,
        node: &str,
        timing: ElectionTiming,
        shutdown: CancellationToken,
    ) -> (Announcer, mpsc::UnboundedReceiver<Held>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Announcer {
                client,
                node: node.to_owned(),
                timing,
                running: HashMap::new(),
                tx,
                shutdown,
            },
            rx,
        )
    }

    /// Takes part in the elections of exactly `services` (keys `namespace/name`): joins the new
    /// ones, leaves (and releases) the others.
    pub fn update(&mut self, services: &BTreeSet<String>) {
        self.running.retain(|key, token| {
            let keep = services.contains(key);
            if !keep {
                token.cancel();
            }
            keep
        });
        for key in services {
            if self.running.contains_key(key) {
                continue;
            }
            let token = self.shutdown.child_token();
            self.running.insert(key.clone(), token.clone());
            let election = LeaderElection::new(
                self.client.clone(),
                LEASE_NAMESPACE,
                &lease_name(key),
                &self.node,
                self.timing,
            );
            let tx = self.tx.clone();
            let key = key.clone();
            tokio::spawn(async move {
                election
                    .run(token.clone(), |leading| {
                        let tx = tx.clone();
                        let key = key.clone();
                        async move {
                            let _ = tx.send((key.clone(), true));
                            leading.cancelled().await;
                            let _ = tx.send((key, false));
                        }
                    })
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_per_service() {
        assert_eq!(lease_name("demo/web"), "skiff-l2-demo-web");
        assert!(lease_name(&format!("ns/{}", "x".repeat(300))).len() <= 253);
    }
}
