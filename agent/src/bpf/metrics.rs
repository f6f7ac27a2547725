//! The pod counters in the Prometheus text format, for the agent's `/metrics`.

use std::fmt::Write as _;

use super::{PodCounters, Traffic};

/// A metric family: name, help text, and the value it takes from one direction's traffic.
type Family = (&'static str, &'static str, fn(&Traffic) -> u64);

/// Renders `skiff_pod_packets_total` and `skiff_pod_bytes_total` with the labels `namespace`,
/// `pod` and `direction` (`ingress`: received by the pod, `egress`: sent by the pod), one
/// sample per pod and direction, in the order given.
pub fn encode_prometheus(counters: &[PodCounters]) -> String {
    let mut out = String::new();
    let families: [Family; 2] = [
        (
            "skiff_pod_packets_total",
            "Packets through a pod's host-side veth; direction is from the pod's point of view (ingress: to the pod, egress: from the pod).",
            |t| t.packets,
        ),
        (
            "skiff_pod_bytes_total",
            "Bytes (Ethernet header included) through a pod's host-side veth; direction is from the pod's point of view (ingress: to the pod, egress: from the pod).",
            |t| t.bytes,
        ),
    ];
    for (name, help, value) in families {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for c in counters {
            for (direction, traffic) in [("ingress", &c.rx), ("egress", &c.tx)] {
                let _ = writeln!(
                    out,
                    "{name}{{namespace=\"{}\",pod=\"{}\",direction=\"{direction}\"}} {}",
                    escape(&c.pod.namespace),
                    escape(&c.pod.name),
                    value(traffic)
                );
            }
        }
    }
    out
}

/// Renders the load-balancing metrics: `skiff_lb_frontend_packets_total` and
/// `skiff_lb_frontend_bytes_total` per frontend (labels `frontend`, `type`, `service`),
/// `skiff_conntrack_entries` (a gauge) and `skiff_datapath_events_total` per kind (`ct_full`
/// counts the conntrack inserts that failed).
pub fn encode_lb_prometheus(
    frontends: &[crate::services::table::FrontendRow],
    conntrack_entries: usize,
    events: &[u64],
) -> String {
    let mut out = String::new();
    type Family = (
        &'static str,
        &'static str,
        fn(&crate::services::table::FrontendRow) -> u64,
    );
    let families: [Family; 2] = [
        (
            "skiff_lb_frontend_packets_total",
            "Packets to a Service frontend translated on this node (client to backend).",
            |r| r.packets,
        ),
        (
            "skiff_lb_frontend_bytes_total",
            "Bytes (Ethernet header included) to a Service frontend translated on this node.",
            |r| r.bytes,
        ),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for row in frontends {
            let _ = writeln!(
                out,
                "{name}{{frontend=\"{}\",type=\"{}\",service=\"{}\"}} {}",
                escape(&row.frontend),
                row.kind,
                escape(&row.service),
                value(row)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP skiff_conntrack_entries Entries in the service conntrack table (two per connection)."
    );
    let _ = writeln!(out, "# TYPE skiff_conntrack_entries gauge");
    let _ = writeln!(out, "skiff_conntrack_entries {conntrack_entries}");
    let _ = writeln!(
        out,
        "# HELP skiff_datapath_events_total Errors and events the eBPF programs counted (ct_full: conntrack inserts that failed, the packet dropped)."
    );
    let _ = writeln!(out, "# TYPE skiff_datapath_events_total counter");
    for (name, value) in skiff_ebpf_common::lb::ERROR_NAMES.iter().zip(events) {
        let _ = writeln!(
            out,
            "skiff_datapath_events_total{{kind=\"{name}\"}} {value}"
        );
    }
    out
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for ch in value.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            _ => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::super::PodIdentity;
    use super::*;

    fn counters(namespace: &str, name: &str, rx: u64, tx: u64) -> PodCounters {
        PodCounters {
            pod: PodIdentity {
                namespace: namespace.into(),
                name: name.into(),
                uid: "u".into(),
                ip: Ipv4Addr::new(10, 244, 0, 2),
            },
            host_ifname: "skfaaa".into(),
            ifindex: 3,
            rx: Traffic {
                packets: rx,
                bytes: rx * 100,
            },
            tx: Traffic {
                packets: tx,
                bytes: tx * 100,
            },
        }
    }

    #[test]
    fn renders_both_families_with_directions_from_the_pods_view() {
        let text = encode_prometheus(&[counters("default", "web-1", 5, 7)]);
        let expected = "\
# HELP skiff_pod_packets_total Packets through a pod's host-side veth; direction is from the pod's point of view (ingress: to the pod, egress: from the pod).
# TYPE skiff_pod_packets_total counter
skiff_pod_packets_total{namespace=\"default\",pod=\"web-1\",direction=\"ingress\"} 5
skiff_pod_packets_total{namespace=\"default\",pod=\"web-1\",direction=\"egress\"} 7
# HELP skiff_pod_bytes_total Bytes (Ethernet header included) through a pod's host-side veth; direction is from the pod's point of view (ingress: to the pod, egress: from the pod).
# TYPE skiff_pod_bytes_total counter
skiff_pod_bytes_total{namespace=\"default\",pod=\"web-1\",direction=\"ingress\"} 500
skiff_pod_bytes_total{namespace=\"default\",pod=\"web-1\",direction=\"egress\"} 700
";
        assert_eq!(text, expected);
    }

    #[test]
    fn no_pods_still_declares_the_families() {
        let text = encode_prometheus(&[]);
        assert_eq!(text.lines().filter(|l| l.starts_with("# TYPE")).count(), 2);
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 0);
    }

    #[test]
    fn label_values_are_escaped() {
        let text = encode_prometheus(&[counters("a\"b", "c\\d\ne", 1, 1)]);
        assert!(text.contains(r#"namespace="a\"b",pod="c\\d\ne""#), "{text}");
    }
}
