//! Validation: the essentials of upstream's `validation.go`, with its
//! messages; the formats apimachinery leaves to each API group.

use super::*;

pub(super) const CONFIG_KEY_FMT: &str = "[-._a-zA-Z0-9]+";
pub(super) const PERCENT_FMT: &str = "[0-9]+%";

pub(super) fn is_config_map_key(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > 253 {
        errs.push(max_len_error(253));
    }
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !ok {
        errs.push(regex_error(
            "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
            CONFIG_KEY_FMT,
            &["key.name", "KEY_NAME", "key-name"],
        ));
    }
    if value == "." {
        errs.push("must not be '.'".to_string());
    } else if value == ".." {
        errs.push("must not be '..'".to_string());
    } else if value.starts_with("..") {
        errs.push("must not start with '..'".to_string());
    }
    errs
}

pub(super) fn is_valid_port_name(port: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if port.len() > 15 {
        errs.push(max_len_error(15));
    }
    if port.is_empty() || !port.chars().all(|c| lower_alnum(c) || c == '-') {
        errs.push(
            "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".to_string(),
        );
    }
    if !port.chars().any(|c| c.is_ascii_lowercase()) {
        errs.push("must contain at least one letter (a-z)".to_string());
    }
    if port.contains("--") {
        errs.push("must not contain consecutive hyphens".to_string());
    }
    if port.starts_with('-') || port.ends_with('-') {
        errs.push("must not begin or end with a hyphen".to_string());
    }
    errs
}

pub(super) const PORT_RANGE_ERROR: &str = "must be between 1 and 65535, inclusive";
pub(super) const NEGATIVE_ERROR: &str = "must be greater than or equal to 0";

pub(super) fn is_valid_port_num(port: i64) -> bool {
    (1..=65535).contains(&port)
}

/// Validate `obj`, a full object of kind `info`, as upstream's
/// `validation.go` does (the essentials), after defaulting; `old` is the
/// stored object on update. Returns every field error; empty means valid.
/// A missing `metadata.name` is accepted when `generateName` is set (the
/// caller generates the name).
pub fn validate(info: &ResourceInfo, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut errs = Vec::new();
    validate_object_meta(info, obj, &mut errs);
    match (info.group, info.kind) {
        ("", "Pod") => {
            if let Some(spec) = obj.get("spec") {
                validate_pod_spec(spec, "spec", &mut errs);
            } else {
                errs.push(required("spec.containers", ""));
            }
            if let (Some(old), Some(new)) = (old.and_then(|o| o.get("spec")), obj.get("spec")) {
                validate_pod_spec_update(new, old, &mut errs);
            }
        }
        ("", "Service") => validate_service(obj, &mut errs),
        ("", "ConfigMap") => validate_config_map(obj, old, &mut errs),
        ("", "Secret") => validate_secret(obj, old, &mut errs),
        ("", "Event") => validate_event(obj, &mut errs),
        ("", "Namespace") => {
            for (i, f) in array(obj.pointer("/spec/finalizers")).iter().enumerate() {
                validate_finalizer(f, &format!("spec.finalizers[{i}]"), true, &mut errs);
            }
        }
        ("coordination.k8s.io", "Lease") => {
            if let Some(d) = obj
                .pointer("/spec/leaseDurationSeconds")
                .and_then(Value::as_i64)
                && d <= 0
            {
                errs.push(invalid(
                    "spec.leaseDurationSeconds",
                    &d.to_string(),
                    "must be greater than 0",
                ));
            }
            if let Some(t) = obj
                .pointer("/spec/leaseTransitions")
                .and_then(Value::as_i64)
                && t < 0
            {
                errs.push(invalid(
                    "spec.leaseTransitions",
                    &t.to_string(),
                    NEGATIVE_ERROR,
                ));
            }
        }
        ("apps", "Deployment") => validate_workload(obj, old, true, &mut errs),
        ("apps", "ReplicaSet") => validate_workload(obj, old, false, &mut errs),
        _ => {}
    }
    errs
}

pub(super) fn array(value: Option<&Value>) -> &[Value] {
    value
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

pub(super) fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

pub(super) fn validate_object_meta(info: &ResourceInfo, obj: &Value, errs: &mut Vec<Cause>) {
    let name_fn: fn(&str) -> Vec<String> = match (info.group, info.kind) {
        ("", "Namespace") => is_dns1123_label,
        ("", "Service") => is_dns1035_label,
        _ => is_dns1123_subdomain,
    };
    let name = str_at(obj, "/metadata/name");
    let generate_name = str_at(obj, "/metadata/generateName");
    if !generate_name.is_empty() {
        // A prefix may end in '-': upstream masks the trailing dash.
        let masked = match generate_name.strip_suffix('-') {
            Some(head) => format!("{head}a"),
            None => generate_name.to_string(),
        };
        for msg in name_fn(&masked) {
            errs.push(invalid_str("metadata.generateName", generate_name, &msg));
        }
    }
    if name.is_empty() {
        if generate_name.is_empty() {
            errs.push(required(
                "metadata.name",
                "name or generateName is required",
            ));
        }
    } else {
        for msg in name_fn(name) {
            errs.push(invalid_str("metadata.name", name, &msg));
        }
    }
    let namespace = str_at(obj, "/metadata/namespace");
    if info.namespaced {
        if namespace.is_empty() {
            errs.push(required("metadata.namespace", ""));
        } else {
            for msg in is_dns1123_label(namespace) {
                errs.push(invalid_str("metadata.namespace", namespace, &msg));
            }
        }
    } else if !namespace.is_empty() {
        errs.push(forbidden("metadata.namespace", "not allowed on this type"));
    }
    if let Some(generation) = obj.pointer("/metadata/generation").and_then(Value::as_i64)
        && generation < 0
    {
        errs.push(invalid(
            "metadata.generation",
            &generation.to_string(),
            NEGATIVE_ERROR,
        ));
    }
    validate_labels(obj.pointer("/metadata/labels"), "metadata.labels", errs);
    validate_annotations(
        obj.pointer("/metadata/annotations"),
        "metadata.annotations",
        errs,
    );
    for f in array(obj.pointer("/metadata/finalizers")) {
        validate_finalizer(f, "metadata.finalizers", false, errs);
    }
}

pub(super) fn validate_finalizer(value: &Value, field: &str, kube: bool, errs: &mut Vec<Cause>) {
    let name = value.as_str().unwrap_or("");
    for msg in is_qualified_name(name) {
        errs.push(invalid_str(field, name, &msg));
    }
    let standard = ["kubernetes", "orphan", "foregroundDeletion"];
    if kube && !name.contains('/') && !standard.contains(&name) {
        errs.push(invalid_str(
            field,
            name,
            "name is neither a standard finalizer name nor is it fully qualified",
        ));
    }
}

/// Label keys and values, in key order (upstream iterates a Go map).
pub(super) fn validate_labels(labels: Option<&Value>, field: &str, errs: &mut Vec<Cause>) {
    let Some(labels) = labels.and_then(Value::as_object) else {
        return;
    };
    let sorted: BTreeMap<&String, &Value> = labels.iter().collect();
    for (key, value) in sorted {
        for msg in is_qualified_name(key) {
            errs.push(invalid_str(field, key, &msg));
        }
        let value = value.as_str().unwrap_or("");
        for msg in is_label_value(value) {
            errs.push(invalid_str(field, value, &msg));
        }
    }
}

pub(super) fn validate_annotations(
    annotations: Option<&Value>,
    field: &str,
    errs: &mut Vec<Cause>,
) {
    let Some(annotations) = annotations.and_then(Value::as_object) else {
        return;
    };
    let sorted: BTreeMap<&String, &Value> = annotations.iter().collect();
    let mut total = 0;
    for (key, value) in sorted {
        for msg in is_qualified_name(&key.to_lowercase()) {
            errs.push(invalid_str(field, key, &msg));
        }
        total += key.len() + value.as_str().map_or(0, str::len);
    }
    if total > TOTAL_ANNOTATION_SIZE_LIMIT {
        errs.push(too_long(field, TOTAL_ANNOTATION_SIZE_LIMIT));
    }
}

/// Check `value` is one of `supported`: missing is `Required`, anything
/// else `NotSupported`.
pub(super) fn validate_enum(
    value: Option<&Value>,
    field: &str,
    supported: &[&str],
    errs: &mut Vec<Cause>,
) {
    match value {
        None | Some(Value::Null) => errs.push(required(field, "")),
        Some(Value::String(s)) if s.is_empty() => errs.push(required(field, "")),
        Some(Value::String(s)) if supported.contains(&s.as_str()) => {}
        Some(other) => errs.push(not_supported(field, other, supported)),
    }
}

pub(super) fn validate_pod_spec(spec: &Value, path: &str, errs: &mut Vec<Cause>) {
    // Volumes: names are unique DNS labels with exactly one source.
    let mut volumes = HashSet::new();
    for (i, volume) in array(spec.get("volumes")).iter().enumerate() {
        let vpath = format!("{path}.volumes[{i}]");
        let name = str_at(volume, "/name");
        if name.is_empty() {
            errs.push(required(format!("{vpath}.name"), ""));
        } else {
            for msg in is_dns1123_label(name) {
                errs.push(invalid_str(format!("{vpath}.name"), name, &msg));
            }
            if !volumes.insert(name.to_string()) {
                errs.push(duplicate(format!("{vpath}.name"), &json!(name)));
            }
        }
        let sources = volume
            .as_object()
            .map_or(0, |v| v.keys().filter(|k| k.as_str() != "name").count());
        if sources == 0 {
            errs.push(required(vpath, "must specify a volume type"));
        } else if sources > 1 {
            errs.push(forbidden(vpath, "may not specify more than 1 volume type"));
        }
    }

    let containers = array(spec.get("containers"));
    if containers.is_empty() {
        errs.push(required(format!("{path}.containers"), ""));
    }
    let mut names = HashSet::new();
    for key in ["initContainers", "containers"] {
        for (i, container) in array(spec.get(key)).iter().enumerate() {
            validate_container(
                container,
                &format!("{path}.{key}[{i}]"),
                &volumes,
                &mut names,
                errs,
            );
        }
    }

    validate_enum(
        spec.get("restartPolicy"),
        &format!("{path}.restartPolicy"),
        &["Always", "OnFailure", "Never"],
        errs,
    );
    validate_enum(
        spec.get("dnsPolicy"),
        &format!("{path}.dnsPolicy"),
        &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"],
        errs,
    );
    validate_labels(
        spec.get("nodeSelector"),
        &format!("{path}.nodeSelector"),
        errs,
    );
    for key in ["serviceAccountName", "nodeName"] {
        let value = str_at(spec, &format!("/{key}"));
        if !value.is_empty() {
            for msg in is_dns1123_subdomain(value) {
                errs.push(invalid_str(format!("{path}.{key}"), value, &msg));
            }
        }
    }
    for key in ["hostname", "subdomain"] {
        let value = str_at(spec, &format!("/{key}"));
        if !value.is_empty() {
            for msg in is_dns1123_label(value) {
                errs.push(invalid_str(format!("{path}.{key}"), value, &msg));
            }
        }
    }
    if let Some(seconds) = spec.get("activeDeadlineSeconds").and_then(Value::as_i64)
        && seconds <= 0
    {
        errs.push(invalid(
            format!("{path}.activeDeadlineSeconds"),
            &seconds.to_string(),
            "must be between 1 and 2147483647, inclusive",
        ));
    }
}

pub(super) fn validate_container(
    container: &Value,
    path: &str,
    volumes: &HashSet<String>,
    names: &mut HashSet<String>,
    errs: &mut Vec<Cause>,
) {
    let name = str_at(container, "/name");
    if name.is_empty() {
        errs.push(required(format!("{path}.name"), ""));
    } else {
        for msg in is_dns1123_label(name) {
            errs.push(invalid_str(format!("{path}.name"), name, &msg));
        }
        if !names.insert(name.to_string()) {
            errs.push(duplicate(format!("{path}.name"), &json!(name)));
        }
    }
    let image = str_at(container, "/image");
    if image.is_empty() {
        errs.push(required(format!("{path}.image"), ""));
    } else if image.trim() != image {
        errs.push(invalid_str(
            format!("{path}.image"),
            image,
            "must not have leading or trailing whitespace",
        ));
    }
    validate_enum(
        container.get("imagePullPolicy"),
        &format!("{path}.imagePullPolicy"),
        &["Always", "IfNotPresent", "Never"],
        errs,
    );
    validate_enum(
        container.get("terminationMessagePolicy"),
        &format!("{path}.terminationMessagePolicy"),
        &["File", "FallbackToLogsOnError"],
        errs,
    );

    let mut port_names = HashSet::new();
    for (i, port) in array(container.get("ports")).iter().enumerate() {
        let ppath = format!("{path}.ports[{i}]");
        let port_name = str_at(port, "/name");
        if !port_name.is_empty() {
            for msg in is_valid_port_name(port_name) {
                errs.push(invalid_str(format!("{ppath}.name"), port_name, &msg));
            }
            if !port_names.insert(port_name.to_string()) {
                errs.push(duplicate(format!("{ppath}.name"), &json!(port_name)));
            }
        }
        match port.get("containerPort").and_then(Value::as_i64) {
            None | Some(0) => errs.push(required(format!("{ppath}.containerPort"), "")),
            Some(p) if !is_valid_port_num(p) => {
                errs.push(invalid(
                    format!("{ppath}.containerPort"),
                    &p.to_string(),
                    PORT_RANGE_ERROR,
                ));
            }
            Some(_) => {}
        }
        if let Some(host) = port.get("hostPort").and_then(Value::as_i64)
            && host != 0
            && !is_valid_port_num(host)
        {
            errs.push(invalid(
                format!("{ppath}.hostPort"),
                &host.to_string(),
                PORT_RANGE_ERROR,
            ));
        }
        validate_enum(
            port.get("protocol"),
            &format!("{ppath}.protocol"),
            &["SCTP", "TCP", "UDP"],
            errs,
        );
    }

    for (i, env) in array(container.get("env")).iter().enumerate() {
        let field = format!("{path}.env[{i}].name");
        let env_name = str_at(env, "/name");
        if env_name.is_empty() {
            errs.push(required(field, ""));
        } else if env_name
            .chars()
            .any(|c| !c.is_ascii() || c.is_ascii_control() || c == '=')
        {
            errs.push(invalid_str(
                field,
                env_name,
                "a valid environment variable name must consist only of printable ASCII characters other than '='",
            ));
        }
    }

    for (i, mount) in array(container.get("volumeMounts")).iter().enumerate() {
        let mpath = format!("{path}.volumeMounts[{i}]");
        let mount_name = str_at(mount, "/name");
        if mount_name.is_empty() {
            errs.push(required(format!("{mpath}.name"), ""));
        } else if !volumes.contains(mount_name) {
            errs.push(not_found(format!("{mpath}.name"), &json!(mount_name)));
        }
        if str_at(mount, "/mountPath").is_empty() {
            errs.push(required(format!("{mpath}.mountPath"), ""));
        }
    }

    validate_resources(
        container.get("resources"),
        &format!("{path}.resources"),
        errs,
    );
}

pub(super) fn is_standard_container_resource(name: &str) -> bool {
    matches!(name, "cpu" | "memory" | "ephemeral-storage") || name.starts_with("hugepages-")
}

pub(super) fn validate_resources(resources: Option<&Value>, path: &str, errs: &mut Vec<Cause>) {
    let Some(resources) = resources else {
        return;
    };
    let mut parsed: [BTreeMap<String, Quantity>; 2] = [BTreeMap::new(), BTreeMap::new()];
    for (slot, key) in ["limits", "requests"].iter().enumerate() {
        let Some(list) = resources.get(*key).and_then(Value::as_object) else {
            continue;
        };
        for (name, value) in list {
            let field = format!("{path}.{key}[{name}]");
            for msg in is_qualified_name(name) {
                errs.push(invalid_str(&field, name, &msg));
            }
            if !name.contains('/') && !is_standard_container_resource(name) {
                errs.push(invalid_str(
                    &field,
                    name,
                    "must be a standard resource for containers",
                ));
            }
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => {
                    errs.push(invalid(
                        &field,
                        &show(other),
                        &QuantityError::Syntax.to_string(),
                    ));
                    continue;
                }
            };
            match Quantity::parse(&text) {
                Ok(q) if q.nanos < 0 => {
                    errs.push(invalid_str(&field, &q.canonical(), NEGATIVE_ERROR));
                }
                Ok(q) => {
                    parsed[slot].insert(name.clone(), q);
                }
                Err(error) => errs.push(invalid_str(&field, &text, &error.to_string())),
            }
        }
    }
    let [limits, requests] = parsed;
    for (name, request) in &requests {
        if let Some(limit) = limits.get(name)
            && request.nanos > limit.nanos
        {
            errs.push(invalid_str(
                format!("{path}.requests"),
                &request.canonical(),
                &format!(
                    "must be less than or equal to {name} limit of {}",
                    limit.canonical()
                ),
            ));
        }
    }
}

/// Pod spec updates: only images, `activeDeadlineSeconds`, added
/// tolerations and `terminationGracePeriodSeconds` may change. Setting
/// `nodeName` where it was empty is let through, since the binding
/// subresource writes it through the same path here.
pub(super) fn validate_pod_spec_update(new: &Value, old: &Value, errs: &mut Vec<Cause>) {
    let mut masked_new = new.clone();
    let mut masked_old = old.clone();
    for spec in [&mut masked_new, &mut masked_old] {
        let Some(map) = spec.as_object_mut() else {
            return;
        };
        for key in [
            "activeDeadlineSeconds",
            "terminationGracePeriodSeconds",
            "tolerations",
        ] {
            map.remove(key);
        }
        if str_at(old, "/nodeName").is_empty() {
            map.remove("nodeName");
        }
        for key in ["containers", "initContainers"] {
            for container in array_mut(map, key) {
                if let Some(c) = container.as_object_mut() {
                    c.remove("image");
                }
            }
        }
    }
    // Tolerations may only be added to.
    let old_tolerations = array(old.get("tolerations"));
    let new_tolerations = array(new.get("tolerations"));
    let removed = old_tolerations.iter().any(|t| !new_tolerations.contains(t));
    if masked_new != masked_old || removed {
        errs.push(forbidden(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
        ));
    }
}

pub(super) fn validate_label_selector(selector: &Value, path: &str, errs: &mut Vec<Cause>) {
    validate_labels(
        selector.get("matchLabels"),
        &format!("{path}.matchLabels"),
        errs,
    );
    for (i, expr) in array(selector.get("matchExpressions")).iter().enumerate() {
        let epath = format!("{path}.matchExpressions[{i}]");
        let has_values = !array(expr.get("values")).is_empty();
        match str_at(expr, "/operator") {
            "In" | "NotIn" => {
                if !has_values {
                    errs.push(required(
                        format!("{epath}.values"),
                        "must be specified when `operator` is 'In' or 'NotIn'",
                    ));
                }
            }
            "Exists" | "DoesNotExist" => {
                if has_values {
                    errs.push(forbidden(
                        format!("{epath}.values"),
                        "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                    ));
                }
            }
            _ => errs.push(not_supported(
                format!("{epath}.operator"),
                expr.get("operator").unwrap_or(&Value::Null),
                &["In", "NotIn", "Exists", "DoesNotExist"],
            )),
        }
        let key = str_at(expr, "/key");
        for msg in is_qualified_name(key) {
            errs.push(invalid_str(format!("{epath}.key"), key, &msg));
        }
        for value in array(expr.get("values")) {
            let value = value.as_str().unwrap_or("");
            for msg in is_label_value(value) {
                errs.push(invalid_str(format!("{epath}.values"), value, &msg));
            }
        }
    }
}

pub(super) fn validate_nonnegative(obj: &Value, pointer: &str, field: &str, errs: &mut Vec<Cause>) {
    if let Some(n) = obj.pointer(pointer).and_then(Value::as_i64)
        && n < 0
    {
        errs.push(invalid(field, &n.to_string(), NEGATIVE_ERROR));
    }
}

/// Deployments (`deployment`) and ReplicaSets, as apps/v1 validates them.
pub(super) fn validate_workload(
    obj: &Value,
    old: Option<&Value>,
    deployment: bool,
    errs: &mut Vec<Cause>,
) {
    let empty = json!({});
    let spec = obj.get("spec").unwrap_or(&empty);
    validate_nonnegative(spec, "/replicas", "spec.replicas", errs);
    validate_nonnegative(spec, "/minReadySeconds", "spec.minReadySeconds", errs);
    let kind = if deployment {
        "deployment"
    } else {
        "replicaset"
    };
    let selector = spec.get("selector").filter(|s| !s.is_null());
    match selector {
        None => errs.push(required("spec.selector", "")),
        Some(selector) => {
            validate_label_selector(selector, "spec.selector", errs);
            let count = selector
                .get("matchLabels")
                .and_then(Value::as_object)
                .map_or(0, Map::len)
                + array(selector.get("matchExpressions")).len();
            if count == 0 {
                errs.push(invalid(
                    "spec.selector",
                    &show(selector),
                    &format!("empty selector is invalid for {kind}"),
                ));
            }
        }
    }
    match spec.get("template").filter(|t| !t.is_null()) {
        None => errs.push(required("spec.template", "")),
        Some(template) => {
            let labels = template.pointer("/metadata/labels");
            if let Some(selector) = selector {
                let count = selector
                    .get("matchLabels")
                    .and_then(Value::as_object)
                    .map_or(0, Map::len)
                    + array(selector.get("matchExpressions")).len();
                let empty_labels = Map::new();
                let label_map = labels.and_then(Value::as_object).unwrap_or(&empty_labels);
                if count > 0 && !skiff_common::labels::json_selector_matches(selector, label_map) {
                    errs.push(invalid(
                        "spec.template.metadata.labels",
                        &show(labels.unwrap_or(&Value::Null)),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
            validate_labels(labels, "spec.template.metadata.labels", errs);
            validate_annotations(
                template.pointer("/metadata/annotations"),
                "spec.template.metadata.annotations",
                errs,
            );
            let pod_spec = template.get("spec").unwrap_or(&empty);
            validate_pod_spec(pod_spec, "spec.template.spec", errs);
            if let Some(policy) = pod_spec
                .get("restartPolicy")
                .filter(|p| p.as_str().is_some_and(|p| p != "Always" && !p.is_empty()))
            {
                errs.push(not_supported(
                    "spec.template.spec.restartPolicy",
                    policy,
                    &["Always"],
                ));
            }
            if pod_spec
                .get("activeDeadlineSeconds")
                .is_some_and(|v| !v.is_null())
            {
                errs.push(forbidden(
                    "spec.template.spec.activeDeadlineSeconds",
                    "activeDeadlineSeconds in ReplicaSet is not Supported",
                ));
            }
        }
    }
    if deployment {
        validate_deployment_strategy(spec, errs);
        validate_nonnegative(
            spec,
            "/revisionHistoryLimit",
            "spec.revisionHistoryLimit",
            errs,
        );
        if let Some(deadline) = spec.get("progressDeadlineSeconds").and_then(Value::as_i64) {
            if deadline < 0 {
                errs.push(invalid(
                    "spec.progressDeadlineSeconds",
                    &deadline.to_string(),
                    NEGATIVE_ERROR,
                ));
            }
            let min_ready = spec
                .get("minReadySeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if deadline <= min_ready {
                errs.push(invalid(
                    "spec.progressDeadlineSeconds",
                    &deadline.to_string(),
                    "must be greater than minReadySeconds",
                ));
            }
        }
    }
    if let Some(old) = old
        && let (Some(new_sel), Some(old_sel)) =
            (obj.pointer("/spec/selector"), old.pointer("/spec/selector"))
        && new_sel != old_sel
    {
        errs.push(invalid(
            "spec.selector",
            &show(new_sel),
            "field is immutable",
        ));
    }
}

/// An `IntOrString` as `getIntOrPercentValue` reads it: `(value, percent)`.
pub(super) fn int_or_percent(value: &Value) -> Option<(i64, bool)> {
    match value {
        Value::Number(n) => n.as_i64().map(|n| (n, false)),
        Value::String(s) => s
            .strip_suffix('%')
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
            .map(|n| (n, true)),
        _ => None,
    }
}

pub(super) fn validate_deployment_strategy(spec: &Value, errs: &mut Vec<Cause>) {
    let Some(strategy) = spec.get("strategy") else {
        return;
    };
    let kind = strategy.get("type");
    validate_enum(
        kind,
        "spec.strategy.type",
        &["Recreate", "RollingUpdate"],
        errs,
    );
    let rolling = strategy.get("rollingUpdate").filter(|r| !r.is_null());
    match kind.and_then(Value::as_str) {
        Some("Recreate") if rolling.is_some() => errs.push(forbidden(
            "spec.strategy.rollingUpdate",
            "may not be specified when strategy `type` is 'Recreate'",
        )),
        Some("RollingUpdate") => match rolling {
            None => errs.push(required(
                "spec.strategy.rollingUpdate",
                "this should be defaulted and never be nil",
            )),
            Some(rolling) => {
                let mut values = [0i64; 2];
                for (slot, key) in ["maxUnavailable", "maxSurge"].iter().enumerate() {
                    let field = format!("spec.strategy.rollingUpdate.{key}");
                    let Some(value) = rolling.get(*key).filter(|v| !v.is_null()) else {
                        continue;
                    };
                    match (value, int_or_percent(value)) {
                        (Value::String(s), None) => errs.push(invalid(
                            &field,
                            s,
                            &regex_error(
                                "a valid percent string must be a numeric string followed by an ending '%'",
                                PERCENT_FMT,
                                &["1%", "93%"],
                            ),
                        )),
                        (_, Some((n, _))) if n < 0 => errs.push(invalid(&field, &n.to_string(), NEGATIVE_ERROR)),
                        (_, Some((n, percent))) => {
                            values[slot] = n;
                            if slot == 0 && percent && n > 100 {
                                errs.push(invalid(&field, &show_int_or_string(value), "must not be greater than 100%"));
                            }
                        }
                        (other, None) => errs.push(invalid(&field, &show(other), "must be an integer or percentage (e.g '5%')")),
                    }
                }
                if values == [0, 0] {
                    let shown =
                        show_int_or_string(rolling.get("maxUnavailable").unwrap_or(&json!(0)));
                    errs.push(invalid(
                        "spec.strategy.rollingUpdate.maxUnavailable",
                        &shown,
                        "may not be 0 when `maxSurge` is 0",
                    ));
                }
            }
        },
        _ => {}
    }
}

pub(super) fn validate_service(obj: &Value, errs: &mut Vec<Cause>) {
    let empty = json!({});
    let spec = obj.get("spec").unwrap_or(&empty);
    let kind = str_at(spec, "/type");
    let headless = str_at(spec, "/clusterIP") == "None";
    validate_enum(
        spec.get("type"),
        "spec.type",
        &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
        errs,
    );
    validate_enum(
        spec.get("sessionAffinity"),
        "spec.sessionAffinity",
        &["ClientIP", "None"],
        errs,
    );
    let ports = array(spec.get("ports"));
    if ports.is_empty() && !headless && kind != "ExternalName" {
        errs.push(required("spec.ports", ""));
    }
    let require_name = ports.len() > 1;
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    let mut node_ports = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let ppath = format!("spec.ports[{i}]");
        let name = str_at(port, "/name");
        if name.is_empty() {
            if require_name {
                errs.push(required(format!("{ppath}.name"), ""));
            }
        } else {
            for msg in is_dns1123_label(name) {
                errs.push(invalid_str(format!("{ppath}.name"), name, &msg));
            }
            if !names.insert(name.to_string()) {
                errs.push(duplicate(format!("{ppath}.name"), &json!(name)));
            }
        }
        let number = port.get("port").and_then(Value::as_i64).unwrap_or(0);
        if !is_valid_port_num(number) {
            errs.push(invalid(
                format!("{ppath}.port"),
                &number.to_string(),
                PORT_RANGE_ERROR,
            ));
        }
        validate_enum(
            port.get("protocol"),
            &format!("{ppath}.protocol"),
            &["SCTP", "TCP", "UDP"],
            errs,
        );
        match port.get("targetPort") {
            Some(Value::Number(n)) => {
                let n = n.as_i64().unwrap_or(0);
                if !is_valid_port_num(n) {
                    errs.push(invalid(
                        format!("{ppath}.targetPort"),
                        &n.to_string(),
                        PORT_RANGE_ERROR,
                    ));
                }
            }
            Some(Value::String(s)) => {
                for msg in is_valid_port_name(s) {
                    errs.push(invalid_str(format!("{ppath}.targetPort"), s, &msg));
                }
            }
            _ => {}
        }
        let protocol = str_at(port, "/protocol").to_string();
        if !keys.insert((number, protocol.clone())) {
            errs.push(duplicate(
                ppath.clone(),
                &json!({"port": number, "protocol": protocol}),
            ));
        }
        let node_port = port.get("nodePort").and_then(Value::as_i64).unwrap_or(0);
        if node_port != 0 {
            if kind == "ClusterIP" {
                errs.push(forbidden(
                    format!("{ppath}.nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                ));
            }
            if !node_ports.insert((node_port, protocol)) {
                errs.push(duplicate(format!("{ppath}.nodePort"), &json!(node_port)));
            }
        }
    }
    validate_labels(spec.get("selector"), "spec.selector", errs);
    for (i, ip) in array(spec.get("clusterIPs")).iter().enumerate() {
        let ip = ip.as_str().unwrap_or("");
        if ip != "None" && ip.parse::<IpAddr>().is_err() {
            errs.push(invalid_str(
                format!("spec.clusterIPs[{i}]"),
                ip,
                "must be a valid IP address (e.g. 10.9.8.7 or 2001:db8::ffff)",
            ));
        }
    }
    if let Some(policy) = spec.get("ipFamilyPolicy").filter(|p| !p.is_null()) {
        validate_enum(
            Some(policy),
            "spec.ipFamilyPolicy",
            &["PreferDualStack", "RequireDualStack", "SingleStack"],
            errs,
        );
    }
    for (i, family) in array(spec.get("ipFamilies")).iter().enumerate() {
        validate_enum(
            Some(family),
            &format!("spec.ipFamilies[{i}]"),
            &["IPv4", "IPv6"],
            errs,
        );
    }
    if kind == "ExternalName" {
        let ips = array(spec.get("clusterIPs"));
        if !ips.is_empty() || !str_at(spec, "/clusterIP").is_empty() {
            errs.push(forbidden(
                "spec.clusterIPs",
                "may not be set for ExternalName services",
            ));
        }
        if !array(spec.get("ipFamilies")).is_empty() {
            errs.push(forbidden(
                "spec.ipFamilies",
                "may not be set for ExternalName services",
            ));
        }
        if spec.get("ipFamilyPolicy").is_some_and(|p| !p.is_null()) {
            errs.push(forbidden(
                "spec.ipFamilyPolicy",
                "may not be set for ExternalName services",
            ));
        }
        let external = str_at(spec, "/externalName");
        let cname = external.strip_suffix('.').unwrap_or(external);
        if cname.is_empty() {
            errs.push(required("spec.externalName", ""));
        } else {
            for msg in is_dns1123_subdomain(cname) {
                errs.push(invalid_str("spec.externalName", cname, &msg));
            }
        }
    }
}

pub(super) fn validate_data_keys(obj: &Value, key: &str, errs: &mut Vec<Cause>) -> usize {
    let mut total = 0;
    if let Some(data) = obj.get(key).and_then(Value::as_object) {
        let sorted: BTreeMap<&String, &Value> = data.iter().collect();
        for (k, v) in sorted {
            for msg in is_config_map_key(k) {
                errs.push(invalid_str(format!("{key}[{k}]"), k, &msg));
            }
            total += v.as_str().map_or(0, str::len);
        }
    }
    total
}

pub(super) fn validate_immutable_data(
    obj: &Value,
    old: Option<&Value>,
    keys: &[&str],
    errs: &mut Vec<Cause>,
) {
    let Some(old) = old else {
        return;
    };
    if old.get("immutable").and_then(Value::as_bool) != Some(true) {
        return;
    }
    if obj.get("immutable").and_then(Value::as_bool) != Some(true) {
        errs.push(forbidden(
            "immutable",
            "field is immutable when `immutable` is set",
        ));
    }
    for key in keys {
        if obj.get(*key) != old.get(*key) {
            errs.push(forbidden(
                *key,
                "field is immutable when `immutable` is set",
            ));
        }
    }
}

pub(super) fn validate_config_map(obj: &Value, old: Option<&Value>, errs: &mut Vec<Cause>) {
    let size = validate_data_keys(obj, "data", errs) + validate_data_keys(obj, "binaryData", errs);
    if let (Some(data), Some(binary)) = (
        obj.get("data").and_then(Value::as_object),
        obj.get("binaryData").and_then(Value::as_object),
    ) {
        for key in data.keys().filter(|k| binary.contains_key(*k)) {
            errs.push(invalid_str(
                format!("data[{key}]"),
                key,
                "duplicate of key present in binaryData",
            ));
        }
    }
    if size > MAX_SECRET_SIZE {
        errs.push(too_long("", MAX_SECRET_SIZE));
    }
    validate_immutable_data(obj, old, &["data", "binaryData"], errs);
}

pub(super) fn validate_secret(obj: &Value, old: Option<&Value>, errs: &mut Vec<Cause>) {
    let mut size = validate_data_keys(obj, "data", errs);
    // stringData is merged into data when the object is decoded; its keys
    // follow the same rule.
    size += validate_data_keys(obj, "stringData", errs);
    if size > MAX_SECRET_SIZE {
        errs.push(too_long("data", MAX_SECRET_SIZE));
    }
    let has = |key: &str| {
        obj.pointer(&format!(
            "/data/{}",
            key.replace('~', "~0").replace('/', "~1")
        ))
        .is_some()
            || obj.pointer(&format!("/stringData/{key}")).is_some()
    };
    let kind = str_at(obj, "/type");
    let required_keys: &[&str] = match kind {
        "kubernetes.io/dockercfg" => &[".dockercfg"],
        "kubernetes.io/dockerconfigjson" => &[".dockerconfigjson"],
        "kubernetes.io/ssh-auth" => &["ssh-privatekey"],
        "kubernetes.io/tls" => &["tls.crt", "tls.key"],
        _ => &[],
    };
    for key in required_keys {
        if !has(key) {
            errs.push(required(format!("data[{key}]"), ""));
        }
    }
    if kind == "kubernetes.io/service-account-token"
        && str_at(
            obj,
            "/metadata/annotations/kubernetes.io~1service-account.name",
        )
        .is_empty()
    {
        errs.push(required(
            "metadata.annotations[kubernetes.io/service-account.name]",
            "",
        ));
    }
    if let Some(old) = old {
        let old_kind = str_at(old, "/type");
        if old_kind != kind {
            errs.push(invalid_str("type", kind, "field is immutable"));
        }
    }
    validate_immutable_data(obj, old, &["data"], errs);
}

pub(super) fn validate_event(obj: &Value, errs: &mut Vec<Cause>) {
    let namespace = str_at(obj, "/metadata/namespace");
    let involved = str_at(obj, "/involvedObject/namespace");
    let ok = if involved.is_empty() {
        namespace.is_empty() || namespace == "default" || namespace == "kube-system"
    } else {
        involved == namespace
    };
    if !ok {
        errs.push(invalid_str(
            "involvedObject.namespace",
            involved,
            "does not match event.namespace",
        ));
    }
    let kind = str_at(obj, "/type");
    if !kind.is_empty() && kind != "Normal" && kind != "Warning" {
        errs.push(invalid_str(
            "type",
            kind,
            &format!("has invalid value: {kind}"),
        ));
    }
}
