//! The CNI commands: ADD, DEL, CHECK, VERSION, STATUS and GC.
//!
//! [`run`] executes one invocation and returns what goes on stdout; [`main_entry`] is the whole
//! program (environment, stdin, stdout, exit code).

use std::collections::HashSet;
use std::io::{IsTerminal, Read, Write};
use std::net::Ipv4Addr;
use std::process::ExitCode;

use serde_json::{Value, json};

use crate::config::{
    Attachment, CniEnv, Command, LATEST_VERSION, NetConf, SUPPORTED_VERSIONS, check_version,
    is_pre_1_0,
};
use crate::dataplane::{
    self, GATEWAY, HOST_VETH_MAC, Netns, WireSpec, format_mac, handle_here, handle_in,
    host_veth_name, link_by_name,
};
use crate::error::CniError;
use crate::ipam::Ipam;
use crate::result::{CniResult, Interface, IpConfig, Route};

/// Runs one invocation: `Ok(Some(json))` is printed on stdout, `Ok(None)` prints nothing.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let command = Command::parse(&env.command)?;
    if command == Command::Version {
        return Ok(Some(version_output(stdin)));
    }
    let conf = match NetConf::parse(stdin) {
        // STATUS reports a configuration it cannot work with as "not available".
        Err(e) if command == Command::Status && e.code() == 7 => {
            return Err(CniError::NotAvailable {
                reason: e.to_string(),
            });
        }
        other => other?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| CniError::Io {
            what: "start the async runtime".into(),
            source,
        })?;
    runtime.block_on(async {
        match command {
            Command::Add => add(env, &conf).await.map(Some),
            Command::Del => del(env, &conf).await.map(|()| None),
            Command::Check => check(env, &conf).await.map(|()| None),
            Command::Status => status(&conf).map(|()| None),
            Command::Gc => gc(&conf).await.map(|()| None),
            Command::Version => unreachable!("handled above"),
        }
    })
}

/// The VERSION answer, echoing the input's `cniVersion` when it is one we speak.
fn version_output(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string());
    json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS})
}

fn attachment(env: &CniEnv) -> Result<Attachment, CniError> {
    Ok(Attachment {
        container_id: env.container_id()?.to_string(),
        ifname: env.ifname()?.to_string(),
    })
}

fn open_netns(env: &CniEnv, container_id: &str) -> Result<Netns, CniError> {
    let path = env.netns()?;
    Netns::open(path).map_err(|source| CniError::UnknownContainer {
        container_id: container_id.to_string(),
        path: path.clone(),
        source,
    })
}

async fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let attachment = attachment(env)?;
    let netns = open_netns(env, &attachment.container_id)?;
    let prev = conf
        .prev_result
        .as_ref()
        .map(CniResult::from_prev)
        .transpose()?;
    let host = handle_here()?;
    let pod = handle_in(&netns)?;
    if link_by_name(&pod, &attachment.ifname).await?.is_some() {
        return Err(CniError::InterfaceExists {
            ifname: attachment.ifname.clone(),
            netns: netns.path().to_path_buf(),
        });
    }
    let ipam = Ipam::open(conf.ipam_dir(), conf.pod_cidr)?;
    let ip = ipam.allocate(&attachment)?;
    let spec = WireSpec {
        network: conf.name.clone(),
        attachment: attachment.clone(),
        ip,
        mtu: conf.mtu,
    };
    let wired = match dataplane::wire(&host, &pod, &netns, &spec).await {
        Ok(w) => w,
        Err(e) => {
            let host_ifname = host_veth_name(&attachment.container_id, &attachment.ifname);
            if let Err(undo) = dataplane::delete_link(&host, &host_ifname).await {
                eprintln!("skiff-cni: rollback: {undo}");
            }
            if let Err(undo) = ipam.release(&attachment) {
                eprintln!("skiff-cni: rollback: {undo}");
            }
            return Err(e);
        }
    };
    let ours = our_result(conf, &netns, &attachment, ip, &wired);
    let merged = prev
        .unwrap_or_default()
        .merge(ours)
        .into_version(&conf.cni_version);
    serde_json::to_value(&merged).map_err(|e| CniError::Io {
        what: "encode the result".into(),
        source: e.into(),
    })
}

/// This plugin's part of the result: host veth first, then the pod interface with the /32.
fn our_result(
    conf: &NetConf,
    netns: &Netns,
    attachment: &Attachment,
    ip: Ipv4Addr,
    wired: &dataplane::Wired,
) -> CniResult {
    CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: wired.host_ifname.clone(),
                mac: Some(format_mac(&HOST_VETH_MAC)),
                ..Default::default()
            },
            Interface {
                name: attachment.ifname.clone(),
                mac: Some(wired.pod_mac.clone()),
                sandbox: Some(netns.path().display().to_string()),
                ..Default::default()
            },
        ],
        ips: vec![IpConfig {
            address: format!("{ip}/32"),
            interface: Some(1),
            ..Default::default()
        }],
        routes: wired
            .default_route
            .then(|| Route {
                dst: "0.0.0.0/0".into(),
                gw: Some(GATEWAY.to_string()),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        dns: conf.dns.clone(),
        ..Default::default()
    }
}

async fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let attachment = attachment(env)?;
    let host = handle_here()?;
    let host_ifname = host_veth_name(&attachment.container_id, &attachment.ifname);
    // Deleting the host end removes the pod end and the node's route with it; a missing link
    // (already deleted, or the namespace is gone and took the pair with it) is fine.
    dataplane::delete_link(&host, &host_ifname).await?;
    if let Some(ipam) = Ipam::open_existing(conf.ipam_dir(), conf.pod_cidr) {
        ipam.release(&attachment)?;
    }
    Ok(())
}

async fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    if is_pre_1_0(&conf.cni_version) && conf.cni_version.as_str() < "0.4.0" {
        return Err(CniError::IncompatibleVersion {
            version: conf.cni_version.clone(),
            supported: "0.4.0 and later for CHECK".into(),
        });
    }
    let attachment = attachment(env)?;
    let prev_value = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::InvalidConfig {
            reason: "CHECK needs prevResult".into(),
        })?;
    let prev = CniResult::from_prev(prev_value)?;
    let netns_path = env.netns()?.display().to_string();
    let index = prev
        .find_interface(&attachment.ifname, &netns_path)
        .ok_or_else(|| CniError::CheckFailed {
            reason: format!(
                "prevResult lists no interface {} in sandbox {netns_path}",
                attachment.ifname
            ),
        })?;
    let ip: Ipv4Addr = prev
        .ips
        .iter()
        .filter(|c| c.interface == Some(index))
        .find_map(|c| c.address.strip_suffix("/32")?.parse().ok())
        .ok_or_else(|| CniError::CheckFailed {
            reason: format!("prevResult has no IPv4 /32 on {}", attachment.ifname),
        })?;
    let ipam = Ipam::open_existing(conf.ipam_dir(), conf.pod_cidr).ok_or_else(|| {
        CniError::CheckFailed {
            reason: format!("ipam store {} does not exist", conf.ipam_dir().display()),
        }
    })?;
    match ipam.find(&attachment)? {
        Some(held) if held == ip => {}
        Some(held) => {
            return Err(CniError::CheckFailed {
                reason: format!("ipam holds {held} for this attachment, prevResult says {ip}"),
            });
        }
        None => {
            return Err(CniError::CheckFailed {
                reason: format!("ipam holds no address for this attachment (prevResult: {ip})"),
            });
        }
    }
    let netns = open_netns(env, &attachment.container_id)?;
    let host = handle_here()?;
    let pod = handle_in(&netns)?;
    let gateway = GATEWAY.to_string();
    let default_route = prev
        .routes
        .iter()
        .any(|r| r.dst == "0.0.0.0/0" && r.gw.as_deref() == Some(gateway.as_str()));
    dataplane::check(&host, &pod, &netns, &attachment, ip, default_route).await
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    let unavailable = |reason: String| CniError::NotAvailable { reason };
    let ipam = Ipam::open(conf.ipam_dir(), conf.pod_cidr)
        .map_err(|e| unavailable(format!("data directory unusable: {e}")))?;
    ipam.probe_writable()
        .map_err(|e| unavailable(format!("data directory not writable: {e}")))?;
    let used = ipam
        .allocations()
        .map_err(|e| unavailable(format!("data directory unreadable: {e}")))?
        .len();
    if used >= ipam.usable_count() as usize {
        return Err(unavailable(format!(
            "pod CIDR {} is exhausted ({used} of {} addresses allocated)",
            conf.pod_cidr,
            ipam.usable_count()
        )));
    }
    Ok(())
}

async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid: HashSet<Attachment> = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| CniError::InvalidConfig {
            reason: "GC needs cni.dev/valid-attachments".into(),
        })?
        .iter()
        .cloned()
        .collect();
    let mut failures: Vec<String> = Vec::new();
    if let Some(ipam) = Ipam::open_existing(conf.ipam_dir(), conf.pod_cidr) {
        let outcome = ipam.gc(&valid);
        for a in &outcome.released {
            eprintln!("skiff-cni: gc: released {} ({:?})", a.ip, a.owner);
        }
        failures.extend(outcome.failures.iter().map(ToString::to_string));
    }
    match handle_here() {
        Ok(host) => {
            let (removed, errors) = dataplane::gc_host_veths(&host, &conf.name, &valid).await;
            for name in removed {
                eprintln!("skiff-cni: gc: removed stale veth {name}");
            }
            failures.extend(errors.iter().map(ToString::to_string));
        }
        Err(e) => failures.push(e.to_string()),
    }
    match failures.first() {
        None => Ok(()),
        Some(first) => Err(CniError::GcIncomplete {
            failures: failures.len(),
            first: first.clone(),
        }),
    }
}

/// The program: reads the environment and stdin, runs, prints the result or the error object on
/// stdout, and exits 0 or 1.
pub fn main_entry() -> ExitCode {
    let env = CniEnv::from_lookup(|k| std::env::var(k).ok());
    let mut stdin = Vec::new();
    let input = std::io::stdin();
    if !input.is_terminal()
        && let Err(e) = input.lock().read_to_end(&mut stdin)
    {
        return emit_error(
            &CniError::Io {
                what: "read stdin".into(),
                source: e,
            },
            LATEST_VERSION,
        );
    }
    // Errors are reported in the configuration's version when it names one we speak.
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .filter(|v| check_version(v).is_ok())
        .unwrap_or_else(|| LATEST_VERSION.to_string());
    match run(&env, &stdin) {
        Ok(out) => {
            if let Some(value) = out {
                let mut stdout = std::io::stdout().lock();
                let written = serde_json::to_writer(&mut stdout, &value)
                    .map_err(std::io::Error::from)
                    .and_then(|()| stdout.write_all(b"\n"))
                    .and_then(|()| stdout.flush());
                if let Err(e) = written {
                    eprintln!("skiff-cni: cannot write the result: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => emit_error(&e, &version),
    }
}

fn emit_error(err: &CniError, version: &str) -> ExitCode {
    let value = err.to_json(version);
    eprintln!(
        "skiff-cni: {}",
        value["details"].as_str().unwrap_or_default()
    );
    println!("{value}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> CniEnv {
        CniEnv {
            command: command.into(),
            ..Default::default()
        }
    }

    #[test]
    fn version_lists_supported_versions() {
        let out = run(&env("VERSION"), br#"{"cniVersion":"0.4.0"}"#)
            .expect("version")
            .expect("output");
        assert_eq!(out["cniVersion"], "0.4.0");
        let versions: Vec<&str> = out["supportedVersions"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for v in ["0.4.0", "1.0.0", "1.1.0"] {
            assert!(versions.contains(&v), "{v} missing from {versions:?}");
        }
        let out = run(&env("VERSION"), b"").expect("version").expect("output");
        assert_eq!(out["cniVersion"], "1.1.0");
    }

    #[test]
    fn unknown_command_is_code_4() {
        let err = run(&env("FROB"), b"{}").expect_err("unknown command");
        assert_eq!(err.code(), 4);
        assert!(err.to_string().contains("FROB"), "{err}");
    }

    #[test]
    fn garbage_on_stdin_is_code_6_and_bad_version_code_1() {
        let err = run(&env("ADD"), b"not json").expect_err("garbage");
        assert_eq!(err.code(), 6);
        let err = run(
            &env("ADD"),
            br#"{"cniVersion":"9.9.9","name":"n","type":"skiff-cni","podCIDR":"10.1.0.0/24"}"#,
        )
        .expect_err("bad version");
        assert_eq!(err.code(), 1);
        assert!(err.to_string().contains("9.9.9"), "{err}");
    }

    #[test]
    fn add_without_container_env_is_code_4() {
        let err = run(
            &env("ADD"),
            br#"{"cniVersion":"1.1.0","name":"n","type":"skiff-cni","podCIDR":"10.1.0.0/24"}"#,
        )
        .expect_err("no CNI_CONTAINERID");
        assert_eq!(err.code(), 4);
        assert!(err.to_string().contains("CNI_CONTAINERID"), "{err}");
    }

    #[test]
    fn status_reports_bad_cidr_unwritable_dir_and_exhaustion_as_50() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = |cidr: &str, data: &str| {
            format!(
                r#"{{"cniVersion":"1.1.0","name":"n","type":"skiff-cni","podCIDR":"{cidr}","dataDir":"{data}"}}"#
            )
        };
        let data = dir.path().display().to_string();
        assert!(
            run(&env("STATUS"), conf("10.1.0.0/24", &data).as_bytes())
                .expect("ok")
                .is_none()
        );
        let err = run(&env("STATUS"), conf("10.1.0.0/33", &data).as_bytes()).expect_err("cidr");
        assert_eq!(err.code(), 50);
        assert!(err.to_string().contains("podCIDR"), "{err}");
        let file = dir.path().join("plain-file");
        std::fs::write(&file, "x").expect("file");
        let err = run(
            &env("STATUS"),
            conf("10.1.0.0/24", &file.display().to_string()).as_bytes(),
        )
        .expect_err("not a dir");
        assert_eq!(err.code(), 50);
        let ipam = Ipam::open(dir.path().join("n"), "10.2.0.0/30".parse().unwrap()).expect("ipam");
        ipam.allocate(&Attachment {
            container_id: "c".into(),
            ifname: "eth0".into(),
        })
        .expect("the only address");
        let err = run(&env("STATUS"), conf("10.2.0.0/30", &data).as_bytes()).expect_err("full");
        assert_eq!(err.code(), 50);
        assert!(err.to_string().contains("exhausted"), "{err}");
    }

    #[test]
    fn gc_without_valid_attachments_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","type":"skiff-cni","podCIDR":"10.1.0.0/24","dataDir":"{}"}}"#,
            dir.path().display()
        );
        let err = run(&env("GC"), conf.as_bytes()).expect_err("no list");
        assert_eq!(err.code(), 7);
    }

    #[test]
    fn error_json_has_the_spec_fields() {
        let err = run(&env("ADD"), b"not json").expect_err("garbage");
        let v = err.to_json("1.0.0");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 6);
        assert!(v["msg"].as_str().is_some_and(|m| m.contains("decode")));
        assert!(
            v["details"]
                .as_str()
                .is_some_and(|d| d.contains("expected")),
            "details carry the JSON error: {v}"
        );
    }
}
