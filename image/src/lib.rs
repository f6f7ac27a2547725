//! skiff's local container image: Debian's busybox-static as a one-layer
//! OCI image, written as an OCI image-layout tar archive that
//! `ctr images import` (containerd 1.6) names `localhost/skiff/busybox:latest`.
//!
//! There is no registry on skiff's machines: `cargo xtask image` writes the
//! archive and `skiffctl up` (and the agent's tests) import it into each
//! node's containerd. The archive is deterministic: the same busybox binary
//! gives the same bytes, hence the same digests (fixed mtimes, owners and
//! entry order), and writing it again changes nothing.
//!
//! Layout of the archive (OCI image-layout 1.0.0):
//! - `oci-layout`, `index.json` (one manifest, annotated with
//!   `io.containerd.image.name` = the full name, which containerd's importer
//!   takes as the image name, and `org.opencontainers.image.ref.name`),
//! - `blobs/sha256/…`: the manifest, the config (`Cmd ["sh"]`, `Env PATH`,
//!   no Entrypoint) and one uncompressed layer: `/bin/busybox`, a symlink to
//!   it per applet in `/bin`, `/etc/passwd` and `/etc/group` with root and
//!   nobody, and the empty directories a container expects (`/tmp` 1777,
//!   `/proc`, `/sys`, `/dev`, `/root`, `/var`, `/etc`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The name containerd gives the imported image.
pub const IMAGE_NAME: &str = "localhost/skiff/busybox:latest";

/// Where Debian's busybox-static installs its binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// The modification time of every entry (2024-01-01T00:00:00Z), so that
/// builds are reproducible.
pub const MTIME: u64 = 1_704_067_200;

/// Applets linked whatever `busybox --list` says (the tests and docs use them).
const REQUIRED_APPLETS: &[&str] = &[
    "sh", "httpd", "nc", "wget", "sleep", "cat", "echo", "ls", "ps", "kill", "env", "hostname",
    "ip", "ping", "true", "false", "mkdir", "rm", "test",
];

/// Errors building the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The busybox binary could not be read.
    #[error("cannot read busybox at {path} (install Debian's busybox-static)")]
    Busybox {
        /// Where it was looked for.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `busybox --list` failed.
    #[error("cannot list the applets of {path}: {message}")]
    Applets {
        /// The binary.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Writing the archive failed.
    #[error("cannot write the image archive {path}")]
    Write {
        /// The archive.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What [`build_image`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// The archive.
    pub path: PathBuf,
    /// The image name containerd gives it on import ([`IMAGE_NAME`]).
    pub name: String,
    /// `sha256:…` of the manifest (containerd's image target digest).
    pub manifest_digest: String,
    /// `sha256:…` of the config (the image ID, as `imageID` in pod status).
    pub config_digest: String,
    /// `sha256:…` of the one uncompressed layer: its diff ID and so the
    /// image's chain ID (the snapshot containerd unpacks it to).
    pub layer_digest: String,
    /// The archive's size in bytes.
    pub size: u64,
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let mut hex = String::with_capacity(64);
    for byte in hash {
        hex.push_str(&format!("{byte:02x}"));
    }
    format!("sha256:{hex}")
}

/// The applets `busybox --list` prints, with [`REQUIRED_APPLETS`], sorted,
/// without `busybox` itself and without names that are not plain file names.
pub fn applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let output = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| ImageError::Applets {
            path: busybox.to_path_buf(),
            message: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(ImageError::Applets {
            path: busybox.to_path_buf(),
            message: format!(
                "exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(applet_names(&String::from_utf8_lossy(&output.stdout)))
}

/// Clean up a `busybox --list` output into the sorted, deduplicated names to
/// link (always including [`REQUIRED_APPLETS`]).
pub fn applet_names(list: &str) -> Vec<String> {
    let mut names: Vec<String> = list
        .lines()
        .map(str::trim)
        .chain(REQUIRED_APPLETS.iter().copied())
        .filter(|n| {
            !n.is_empty()
                && *n != "busybox"
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.[".contains(&b))
        })
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(MTIME);
    header.set_uid(0);
    header.set_gid(0);
    let _ = header.set_username("root");
    let _ = header.set_groupname("root");
    header
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// The root filesystem layer (an uncompressed tar) for `busybox` with `applets`.
pub fn layer(busybox_bytes: &[u8], applets: &[String]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let dirs: &[(&str, u32)] = &[
        ("bin/", 0o755),
        ("dev/", 0o755),
        ("etc/", 0o755),
        ("proc/", 0o555),
        ("root/", 0o700),
        ("sys/", 0o555),
        ("tmp/", 0o1777),
        ("usr/", 0o755),
        ("usr/bin/", 0o755),
        ("var/", 0o755),
        ("var/www/", 0o755),
    ];
    for (dir, mode) in dirs {
        let mut h = header(tar::EntryType::Directory, *mode, 0);
        builder.append_data(&mut h, dir, std::io::empty())?;
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox_bytes.len() as u64);
    builder.append_data(&mut h, "bin/busybox", busybox_bytes)?;
    for applet in applets {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        builder.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    let files: &[(&str, &str)] = &[
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnobody:x:65534:\n"),
    ];
    for (path, content) in files {
        let mut h = header(tar::EntryType::Regular, 0o644, content.len() as u64);
        builder.append_data(&mut h, path, content.as_bytes())?;
    }
    builder.into_inner()
}

/// The image config for a layer with diff ID `layer_digest`.
pub fn config(layer_digest: &str) -> Value {
    json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "skiff-image: busybox-static"}],
    })
}

/// Build the image from `busybox` (see [`DEFAULT_BUSYBOX`]) and write its
/// OCI image-layout archive to `out` (atomically: a temporary file renamed
/// over it).
pub fn build_image(busybox: &Path, out: &Path) -> Result<BuiltImage, ImageError> {
    let bytes = fs::read(busybox).map_err(|source| ImageError::Busybox {
        path: busybox.to_path_buf(),
        source,
    })?;
    let names = applets(busybox)?;
    let wrap = io_error(out);
    let layer = layer(&bytes, &names).map_err(&wrap)?;
    let layer_digest = sha256_digest(&layer);
    let config = serde_json::to_vec(&config(&layer_digest)).expect("json serializes");
    let config_digest = sha256_digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .expect("json serializes");
    let manifest_digest = sha256_digest(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": IMAGE_NAME,
                "org.opencontainers.image.ref.name": "latest",
            },
        }],
    }))
    .expect("json serializes");
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;

    let mut archive = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    archive
        .append_data(&mut h, "blobs/", std::io::empty())
        .map_err(&wrap)?;
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    archive
        .append_data(&mut h, "blobs/sha256/", std::io::empty())
        .map_err(&wrap)?;
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let entries: [(String, &[u8]); 5] = [
        (blob(&config_digest), &config),
        (blob(&layer_digest), &layer),
        (blob(&manifest_digest), &manifest),
        ("index.json".to_string(), &index),
        ("oci-layout".to_string(), layout),
    ];
    for (path, data) in entries {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        archive.append_data(&mut h, path, data).map_err(&wrap)?;
    }
    let data = archive.into_inner().map_err(&wrap)?;

    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(&wrap)?;
    }
    let unchanged = fs::read(out).is_ok_and(|old| old == data);
    if !unchanged {
        let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
        let mut file = fs::File::create(&tmp).map_err(&wrap)?;
        file.write_all(&data).map_err(&wrap)?;
        file.sync_all().map_err(&wrap)?;
        drop(file);
        fs::rename(&tmp, out).map_err(&wrap)?;
    }
    Ok(BuiltImage {
        path: out.to_path_buf(),
        name: IMAGE_NAME.to_string(),
        manifest_digest,
        config_digest,
        layer_digest,
        size: data.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read;

    fn entries(data: &[u8]) -> BTreeMap<String, (tar::EntryType, Vec<u8>, Option<String>)> {
        let mut archive = tar::Archive::new(data);
        let mut out = BTreeMap::new();
        for entry in archive.entries().expect("a tar") {
            let mut entry = entry.expect("an entry");
            let path = entry.path().expect("a path").display().to_string();
            let kind = entry.header().entry_type();
            let link = entry
                .link_name()
                .expect("link name")
                .map(|l| l.display().to_string());
            assert_eq!(entry.header().mtime().expect("mtime"), MTIME);
            let mut content = Vec::new();
            entry.read_to_end(&mut content).expect("read");
            out.insert(path, (kind, content, link));
        }
        out
    }

    #[test]
    fn applet_list_is_cleaned_and_completed() {
        let names = applet_names("sh\nls\n[\n[[\nbusybox\n\nwget\nbad/name\n");
        assert!(names.contains(&"[".to_string()));
        assert!(
            names.contains(&"httpd".to_string()),
            "required applets added"
        );
        assert!(!names.iter().any(|n| n == "busybox" || n.contains('/')));
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    #[test]
    fn layer_holds_busybox_links_and_users() {
        let layer = layer(b"fake-binary", &["sh".into(), "wget".into()]).expect("layer");
        let files = entries(&layer);
        assert_eq!(files["bin/busybox"].1, b"fake-binary");
        assert_eq!(files["bin/sh"].0, tar::EntryType::Symlink);
        assert_eq!(files["bin/sh"].2.as_deref(), Some("busybox"));
        assert!(String::from_utf8_lossy(&files["etc/passwd"].1).starts_with("root:x:0:0:"));
        assert_eq!(files["tmp/"].0, tar::EntryType::Directory);
    }

    #[test]
    fn image_archive_is_a_deterministic_oci_layout() {
        let busybox = Path::new(DEFAULT_BUSYBOX);
        if !busybox.exists() {
            panic!("{DEFAULT_BUSYBOX} is missing: run cargo xtask setup (busybox-static)");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("img.oci.tar");
        let first = build_image(busybox, &out).expect("build");
        let bytes = fs::read(&out).expect("read");
        let second = build_image(busybox, &out).expect("rebuild");
        assert_eq!(first, second, "same digests");
        assert_eq!(bytes, fs::read(&out).expect("read"), "same bytes");
        let files = entries(&bytes);
        let index: Value = serde_json::from_slice(&files["index.json"].1).expect("index");
        let m = &index["manifests"][0];
        assert_eq!(m["digest"], first.manifest_digest);
        assert_eq!(m["annotations"]["io.containerd.image.name"], IMAGE_NAME);
        let blob = |d: &str| &files[&format!("blobs/sha256/{}", &d[7..])].1;
        assert_eq!(
            sha256_digest(blob(&first.manifest_digest)),
            first.manifest_digest
        );
        let config: Value = serde_json::from_slice(blob(&first.config_digest)).expect("config");
        assert_eq!(config["config"]["Cmd"], json!(["sh"]));
        assert!(config["config"].get("Entrypoint").is_none());
        assert_eq!(config["rootfs"]["diff_ids"][0], first.layer_digest);
        let layer = entries(blob(&first.layer_digest));
        for applet in REQUIRED_APPLETS {
            assert!(
                layer.contains_key(&format!("bin/{applet}")),
                "{applet} linked"
            );
        }
    }
}
