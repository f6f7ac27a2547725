//! `cargo xtask gen-protobuf`: generates `control/apiserver/src/protobuf/schema.rs`, the table that drives
//! the API server's Kubernetes protobuf decoder (`skiff_apiserver::protobuf`).
//!
//! The field numbers and wire types come from k8s-pb's prost structs (their
//! `#[prost(type, label, tag = "N")]` attributes), read as Rust source with `syn`; k8s-pb is a
//! dev-dependency of skiff-control, so `cargo metadata` locates its sources. The JSON names come
//! from k8s-openapi's schemars schemas: prost's snake_case names lose upstream's spelling
//! (`host_ip` is `hostIP`, `pod_cidrs` is `podCIDRs`), so each field is matched, ignoring case and
//! underscores, against the properties of the k8s-openapi type of the same name. Any field, type
//! or wire type that cannot be mapped stops the generator with an error naming it.
//!
//! Only the messages reachable from [`roots`] are written, which keeps the table small.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::schemars::JsonSchema;
use k8s_openapi::schemars::generate::SchemaGenerator;
use serde_json::Value;

/// Where the generated table goes, relative to the workspace root.
const OUTPUT: &str = "control/apiserver/src/protobuf/schema.rs";

/// Messages with a JSON form of their own, decoded by hand-written code in the decoder, by their
/// OpenAPI name, with the decoder's `Kind` variant.
const SPECIAL: &[(&str, &str)] = &[
    ("io.k8s.apimachinery.pkg.apis.meta.v1.Time", "Time"),
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.MicroTime",
        "MicroTime",
    ),
    ("io.k8s.apimachinery.pkg.apis.meta.v1.Duration", "Duration"),
    ("io.k8s.apimachinery.pkg.apis.meta.v1.FieldsV1", "FieldsV1"),
    (
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString",
        "IntOrString",
    ),
    ("io.k8s.apimachinery.pkg.api.resource.Quantity", "Quantity"),
    (
        "io.k8s.apimachinery.pkg.runtime.RawExtension",
        "RawExtension",
    ),
];

/// Fields of k8s-pb (built from Kubernetes 1.35) that Kubernetes 1.37 no longer has (alpha fields
/// since removed), by message and prost field name: the decoder skips them as unknown numbers.
const SKEWED: &[(&str, &str)] = &[("io.k8s.api.core.v1.PodSpec", "workload_ref")];

/// One top-level type the decoder accepts in an envelope.
struct Root {
    /// The envelope's `apiVersion`.
    api_version: &'static str,
    /// The envelope's `kind`.
    kind: &'static str,
    /// The OpenAPI (and, with `io.k8s.` dropped, k8s-pb module) name.
    name: String,
}

/// Registers `T`, a k8s-openapi resource type, as a root, and its schemas in `generator`.
fn resource<T: k8s_openapi::Resource + JsonSchema>(
    generator: &mut SchemaGenerator,
    roots: &mut Vec<Root>,
) {
    generator.subschema_for::<T>();
    roots.push(Root {
        api_version: T::API_VERSION,
        kind: T::KIND,
        name: T::schema_name().into(),
    });
}

/// The top-level types: every kind the API server serves (control/common/src/registry.rs), the bodies
/// of its subresources and deletes, and the other common built-in kinds, so that adding one to
/// the registry rarely needs a new table.
fn roots(generator: &mut SchemaGenerator) -> Vec<Root> {
    use k8s_openapi::api::{
        apps, authentication, autoscaling, batch, coordination, core, discovery, events,
        networking, policy, rbac, scheduling, storage,
    };
    let mut roots = Vec::new();
    macro_rules! resources {
        ($($t:ty),* $(,)?) => { $(resource::<$t>(generator, &mut roots);)* };
    }
    resources!(
        core::v1::Binding,
        core::v1::ConfigMap,
        core::v1::Endpoints,
        core::v1::Event,
        core::v1::LimitRange,
        core::v1::Namespace,
        core::v1::Node,
        core::v1::PersistentVolume,
        core::v1::PersistentVolumeClaim,
        core::v1::Pod,
        core::v1::PodTemplate,
        core::v1::ReplicationController,
        core::v1::ResourceQuota,
        core::v1::Secret,
        core::v1::Service,
        core::v1::ServiceAccount,
        apps::v1::ControllerRevision,
        apps::v1::DaemonSet,
        apps::v1::Deployment,
        apps::v1::ReplicaSet,
        apps::v1::StatefulSet,
        authentication::v1::TokenRequest,
        autoscaling::v1::HorizontalPodAutoscaler,
        autoscaling::v1::Scale,
        autoscaling::v2::HorizontalPodAutoscaler,
        batch::v1::CronJob,
        batch::v1::Job,
        coordination::v1::Lease,
        discovery::v1::EndpointSlice,
        events::v1::Event,
        networking::v1::Ingress,
        networking::v1::IngressClass,
        networking::v1::NetworkPolicy,
        policy::v1::Eviction,
        policy::v1::PodDisruptionBudget,
        rbac::v1::ClusterRole,
        rbac::v1::ClusterRoleBinding,
        rbac::v1::Role,
        rbac::v1::RoleBinding,
        scheduling::v1::PriorityClass,
        storage::v1::StorageClass,
    );
    // DeleteOptions is registered in every group-version; the decoder falls back to this entry
    // whatever the envelope's apiVersion.
    type DeleteOptions = k8s_openapi::apimachinery::pkg::apis::meta::v1::DeleteOptions;
    generator.subschema_for::<DeleteOptions>();
    roots.push(Root {
        api_version: "meta.k8s.io/v1",
        kind: "DeleteOptions",
        name: DeleteOptions::schema_name().into(),
    });
    roots
}

/// A field of a prost message, as read from k8s-pb.
struct ProstField {
    /// The Rust field name, without `r#`.
    ident: String,
    /// The prost scalar type (`string`, `int32`, `message`…), or the map's value type.
    ty: String,
    /// `optional`, `repeated` or `map`.
    label: &'static str,
    /// The field number.
    tag: u32,
    /// For `message` values, the OpenAPI name of the message type.
    message: Option<String>,
}

/// Runs the generator: writes [`OUTPUT`] under `ws` and formats it.
pub fn generate(ws: &Path) -> Result<()> {
    let (src, pb_version, openapi_version) = k8s_pb_sources(ws)?;
    let mut generator = SchemaGenerator::default();
    let roots = roots(&mut generator);
    let definitions = generator.definitions().clone();
    // prost renames types as it does fields (`PodDNSConfig` is `PodDnsConfig`): messages are
    // keyed, and message types named, by their OpenAPI spelling where there is one.
    let by_lowercase: HashMap<String, String> = definitions
        .keys()
        .map(|k| (k.to_lowercase(), k.clone()))
        .collect();
    let canonical = |name: &str| {
        by_lowercase
            .get(&name.to_lowercase())
            .cloned()
            .unwrap_or_else(|| name.to_string())
    };
    let mut messages = HashMap::new();
    for (name, mut fields) in read_messages(&src)? {
        for field in &mut fields {
            if let Some(m) = &field.message {
                field.message = Some(canonical(m));
            }
        }
        let key = canonical(&name);
        ensure!(
            messages.insert(key.clone(), fields).is_none(),
            "two k8s-pb messages are named {key} ignoring case"
        );
    }

    // Number the messages reachable from the roots, breadth first.
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut queue: VecDeque<String> = VecDeque::new();
    // The schema holding each message's JSON properties: its own, or for a message embedded
    // inline in JSON (PersistentVolumeSource in PersistentVolumeSpec…), the embedding one's.
    let mut schema_of: HashMap<String, String> = HashMap::new();
    for root in &roots {
        if !index.contains_key(&root.name) {
            index.insert(root.name.clone(), order.len());
            order.push(root.name.clone());
            queue.push_back(root.name.clone());
        }
    }
    let mut tables: Vec<Vec<String>> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    while let Some(name) = queue.pop_front() {
        let fields = messages
            .get(&name)
            .with_context(|| format!("k8s-pb has no message {name}"))?;
        let schema = schema_of.get(&name).unwrap_or(&name).clone();
        let definition = definitions
            .get(&schema)
            .with_context(|| format!("k8s-openapi has no schema {schema} (for {name})"))?;
        let properties = definition
            .get("properties")
            .and_then(Value::as_object)
            .with_context(|| format!("the schema of {name} has no properties"))?;
        let required: Vec<&str> = definition
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut rows = Vec::new();
        let mut inline_targets: Vec<&String> = Vec::new();
        for field in fields {
            let wanted = field.ident.replace('_', "").to_lowercase();
            let matches: Vec<&String> = properties
                .keys()
                .filter(|k| k.to_lowercase() == wanted)
                .collect();
            if SKEWED.contains(&(name.as_str(), field.ident.as_str())) {
                continue;
            }
            let inline = field.ty == "message" && field.label == "optional";
            let json = match matches.as_slice() {
                [one] => one.as_str(),
                // Go's `json:",inline"`: the embedded message's fields are the parent's. A type
                // with no schema of its own takes the parent's (checked when it is walked).
                [] if inline => {
                    inline_targets.extend(field.message.as_ref());
                    let target = field.message.clone().unwrap_or_default();
                    if !definitions.contains_key(&target)
                        && let Some(previous) = schema_of.insert(target.clone(), schema.clone())
                    {
                        ensure!(
                            previous == schema,
                            "{target} is inlined in both {previous} and {schema}"
                        );
                    }
                    ""
                }
                [] => bail!(
                    "no JSON property of {schema} matches field {} of {name}",
                    field.ident
                ),
                _ => bail!(
                    "several JSON properties of {schema} match field {} of {name}: {matches:?}",
                    field.ident
                ),
            };
            let kind = match field.ty.as_str() {
                "string" => "Str".to_string(),
                "bool" => "Bool".to_string(),
                "int32" => "Int32".to_string(),
                "int64" => "Int64".to_string(),
                "double" => "Double".to_string(),
                "bytes" => "Bytes".to_string(),
                "message" => {
                    let target = field.message.as_ref().with_context(|| {
                        format!("field {} of {name} has no message type", field.ident)
                    })?;
                    if let Some((_, special)) = SPECIAL.iter().find(|(n, _)| n == target) {
                        (*special).to_string()
                    } else {
                        let i = match index.get(target) {
                            Some(i) => *i,
                            None => {
                                index.insert(target.clone(), order.len());
                                order.push(target.clone());
                                queue.push_back(target.clone());
                                order.len() - 1
                            }
                        };
                        format!("Object({i})")
                    }
                }
                other => bail!(
                    "field {} of {name} has unsupported type {other}",
                    field.ident
                ),
            };
            let shape = match field.label {
                "optional" => "One",
                "repeated" => "Repeated",
                "map" => "Map",
                other => bail!(
                    "field {} of {name} has unsupported label {other}",
                    field.ident
                ),
            };
            rows.push((
                field.tag,
                format!(
                    "f({}, {json:?}, {kind}, {shape}, {}),",
                    field.tag,
                    required.contains(&json)
                ),
            ));
        }
        if schema == name {
            for property in properties.keys() {
                let known = fields
                    .iter()
                    .any(|f| f.ident.replace('_', "").to_lowercase() == property.to_lowercase())
                    || ["apiVersion", "kind"].contains(&property.as_str());
                if !known && !from_inline(&inline_targets, &messages, property) {
                    missing.push(format!("{name}.{property}"));
                }
            }
        }
        rows.sort_by_key(|(tag, _)| *tag);
        ensure!(
            rows.windows(2).all(|w| w[0].0 != w[1].0),
            "{name} has two fields with the same number"
        );
        tables.push(rows.into_iter().map(|(_, row)| row).collect());
    }
    ensure!(
        order.len() <= usize::from(u16::MAX),
        "too many messages for u16 indices"
    );

    let mut out = String::new();
    writeln!(
        out,
        "//! The Kubernetes protobuf schema the decoder walks: field numbers, JSON names and wire\n\
         //! kinds of every message reachable from the top-level kinds in [`KINDS`].\n\
         //!\n\
         //! @generated by `cargo xtask gen-protobuf` from k8s-pb {pb_version} and k8s-openapi\n\
         //! {openapi_version}: do not edit by hand.\n//!\n\
         //! Fields of k8s-openapi that k8s-pb lacks (newer than its Kubernetes), which the decoder\n\
         //! skips as unknown field numbers:{}\n\n\
         use super::Kind::*;\n\
         use super::Shape::*;\n\
         use super::{{Message, field as f}};\n\n\
         /// The top-level types: `(apiVersion, kind, index in MESSAGES)`.\n\
         pub(super) static KINDS: &[(&str, &str, u16)] = &[",
        if missing.is_empty() {
            " none.".to_string()
        } else {
            missing
                .iter()
                .map(|m| format!("\n//! - `{m}`"))
                .collect::<String>()
        }
    )?;
    for root in &roots {
        writeln!(
            out,
            "    ({:?}, {:?}, {}),",
            root.api_version, root.kind, index[&root.name]
        )?;
    }
    writeln!(
        out,
        "];\n\n/// Every message, with its fields sorted by number.\npub(super) static MESSAGES: &[Message] = &["
    )?;
    for (i, (name, rows)) in order.iter().zip(&tables).enumerate() {
        writeln!(
            out,
            "    // {i}\n    Message {{\n        name: {name:?},\n        fields: &["
        )?;
        for row in rows {
            writeln!(out, "            {row}")?;
        }
        writeln!(out, "        ],\n    }},")?;
    }
    writeln!(out, "];")?;

    let path = ws.join(OUTPUT);
    fs::create_dir_all(path.parent().context("output has a parent")?)?;
    fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    let status = Command::new("rustfmt")
        .args(["--edition", "2024"])
        .arg(&path)
        .status()
        .context("running rustfmt")?;
    ensure!(status.success(), "rustfmt failed on {}", path.display());
    if !missing.is_empty() {
        println!(
            "k8s-pb lacks these fields of k8s-openapi {openapi_version}; the decoder skips them:\n  {}",
            missing.join("\n  ")
        );
    }
    println!(
        "wrote {} ({} kinds, {} messages)",
        path.display(),
        roots.len(),
        order.len()
    );
    Ok(())
}

/// k8s-pb's `src/` directory, k8s-pb's version and k8s-openapi's version, from `cargo metadata`.
fn k8s_pb_sources(ws: &Path) -> Result<(PathBuf, String, String)> {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1"])
        .current_dir(ws)
        .output()
        .context("running cargo metadata")?;
    ensure!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value =
        serde_json::from_slice(&output.stdout).context("parsing cargo metadata")?;
    let packages = metadata["packages"]
        .as_array()
        .context("cargo metadata has no packages")?;
    let find = |name: &str| {
        packages
            .iter()
            .find(|p| p["name"] == name)
            .with_context(|| format!("{name} is not in the dependency graph (skiff-control's dev-dependencies must list it)"))
    };
    let pb = find("k8s-pb")?;
    let manifest = pb["manifest_path"]
        .as_str()
        .context("k8s-pb has no manifest_path")?;
    let src = Path::new(manifest)
        .parent()
        .context("manifest has a parent")?
        .join("src");
    let version = |p: &Value| p["version"].as_str().unwrap_or("?").to_string();
    Ok((src, version(pb), version(find("k8s-openapi")?)))
}

/// Every prost message under `src`, by OpenAPI name (`io.k8s.` + module path + struct name).
fn read_messages(src: &Path) -> Result<HashMap<String, Vec<ProstField>>> {
    let mut messages = HashMap::new();
    let mut files = Vec::new();
    collect_files(src, &mut files)?;
    for file in files {
        let rel = file.strip_prefix(src).context("file under src")?;
        let mut module: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        let last = module.pop().context("file has a name")?;
        if last != "mod.rs" && last != "lib.rs" {
            module.push(last.trim_end_matches(".rs").to_string());
        }
        let text =
            fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let parsed =
            syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
        read_items(&parsed.items, &module, &mut messages)
            .with_context(|| format!("in {}", file.display()))?;
    }
    Ok(messages)
}

/// The `.rs` files under `dir`, recursively.
fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The OpenAPI name of type `name` in k8s-pb module `module`.
fn openapi_name(module: &[String], name: &str) -> String {
    let path: Vec<String> = module
        .iter()
        .map(|m| match m.as_str() {
            "apiextensions_apiserver" => "apiextensions-apiserver".to_string(),
            "kube_aggregator" => "kube-aggregator".to_string(),
            other => other.to_string(),
        })
        .collect();
    format!("io.k8s.{}.{name}", path.join("."))
}

/// Reads the prost structs among `items` (and inline modules) of `module` into `messages`.
fn read_items(
    items: &[syn::Item],
    module: &[String],
    messages: &mut HashMap<String, Vec<ProstField>>,
) -> Result<()> {
    for item in items {
        match item {
            syn::Item::Struct(s) => {
                let mut fields = Vec::new();
                for field in &s.fields {
                    let Some(attr) = field.attrs.iter().find(|a| a.path().is_ident("prost")) else {
                        continue;
                    };
                    let ident = field
                        .ident
                        .as_ref()
                        .context("prost field without a name")?
                        .to_string()
                        .trim_start_matches("r#")
                        .to_string();
                    fields.push(
                        read_field(attr, &field.ty, ident.clone(), module)
                            .with_context(|| format!("field {ident} of {}", s.ident))?,
                    );
                }
                if !fields.is_empty() {
                    messages.insert(openapi_name(module, &s.ident.to_string()), fields);
                }
            }
            syn::Item::Mod(m) => {
                if let Some((_, inner)) = &m.content {
                    let mut sub = module.to_vec();
                    sub.push(m.ident.to_string());
                    read_items(inner, &sub, messages)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// One field from its `#[prost(…)]` attribute and Rust type.
fn read_field(
    attr: &syn::Attribute,
    ty: &syn::Type,
    ident: String,
    module: &[String],
) -> Result<ProstField> {
    let mut scalar: Option<String> = None;
    let mut label = "optional";
    let mut tag = None;
    attr.parse_nested_meta(|meta| {
        let key = meta
            .path
            .get_ident()
            .map(ToString::to_string)
            .unwrap_or_default();
        match key.as_str() {
            "optional" | "boxed" => {}
            "repeated" => label = "repeated",
            "required" => {}
            "tag" => {
                let lit: syn::LitStr = meta.value()?.parse()?;
                tag = Some(lit.value());
            }
            "packed" => {
                let _: syn::LitStr = meta.value()?.parse()?;
            }
            "bytes" => {
                if meta.input.peek(syn::Token![=]) {
                    let _: syn::LitStr = meta.value()?.parse()?;
                }
                scalar = Some("bytes".into());
            }
            "btree_map" | "map" | "hash_map" => {
                let lit: syn::LitStr = meta.value()?.parse()?;
                let value = lit.value();
                let (k, v) = value
                    .split_once(',')
                    .ok_or_else(|| meta.error("map type without a comma"))?;
                if k.trim() != "string" {
                    return Err(meta.error(format!("map key type {k} is not string")));
                }
                label = "map";
                scalar = Some(v.trim().to_string());
            }
            "string" | "bool" | "int32" | "int64" | "double" | "message" => scalar = Some(key),
            other => return Err(meta.error(format!("unsupported prost attribute {other}"))),
        }
        Ok(())
    })?;
    let ty_name = scalar.context("no prost type")?;
    let tag: u32 = tag
        .context("no tag")?
        .parse()
        .context("tag is not a number")?;
    let message = if ty_name == "message" {
        Some(message_type(ty, module)?)
    } else {
        None
    };
    Ok(ProstField {
        ident,
        ty: ty_name,
        label,
        tag,
        message,
    })
}

/// The OpenAPI name of the message in `ty` (looking through `Option`, `Vec`, `Box` and maps).
fn message_type(ty: &syn::Type, module: &[String]) -> Result<String> {
    let syn::Type::Path(p) = ty else {
        bail!("message field of an unexpected type")
    };
    let last = p.path.segments.last().context("empty type path")?;
    let args: Vec<&syn::Type> = match &last.arguments {
        syn::PathArguments::AngleBracketed(a) => a
            .args
            .iter()
            .filter_map(|g| match g {
                syn::GenericArgument::Type(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    match last.ident.to_string().as_str() {
        "Option" | "Vec" | "Box" => {
            return message_type(args.first().context("wrapper without an argument")?, module);
        }
        "BTreeMap" | "HashMap" => {
            return message_type(args.get(1).context("map without a value type")?, module);
        }
        _ => {}
    }
    let mut base = module.to_vec();
    let segments: Vec<String> = p
        .path
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect();
    let (name, path) = segments.split_last().context("empty type path")?;
    for segment in path {
        match segment.as_str() {
            "super" => {
                base.pop().context("super above the crate root")?;
            }
            "crate" => base.clear(),
            "self" => {}
            other => base.push(other.to_string()),
        }
    }
    Ok(openapi_name(&base, name))
}

/// Whether `property` of a schema comes from one of the messages embedded inline (`inline`).
fn from_inline(
    inline: &[&String],
    messages: &HashMap<String, Vec<ProstField>>,
    property: &str,
) -> bool {
    let wanted = property.to_lowercase();
    inline.iter().any(|m| {
        messages.get(*m).is_some_and(|inner| {
            inner
                .iter()
                .any(|f| f.ident.replace('_', "").to_lowercase() == wanted)
        })
    })
}
