//! The pin tree in bpffs (`<bpffs>/skiff/<node>/{maps,progs,links}`) and bpffs itself.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use super::{BpfError, Hook};

/// Where one node's pins live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    node: String,
    root: PathBuf,
}

impl PinLayout {
    /// The layout of `node` under `<bpffs>/skiff/`; the node name must be usable as a directory
    /// name.
    pub fn new(bpffs: &Path, node: &str) -> Result<PinLayout, BpfError> {
        check_component("node name", node)?;
        Ok(PinLayout {
            node: node.to_owned(),
            root: bpffs.join("skiff").join(node),
        })
    }

    /// The node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// `<bpffs>/skiff/<node>`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the maps are pinned (by their names).
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Where the programs of every loaded object version are pinned.
    pub fn progs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }

    /// Where the links are pinned.
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The pin of the link of `hook` on `ifname`.
    pub fn link_pin(&self, ifname: &str, hook: Hook) -> PathBuf {
        self.links_dir().join(format!("{ifname}-{}", hook.as_str()))
    }

    /// Creates the directories (idempotent).
    pub fn create_dirs(&self) -> Result<(), BpfError> {
        for dir in [self.maps_dir(), self.progs_dir(), self.links_dir()] {
            create_dir(&dir)?;
        }
        Ok(())
    }
}

/// Refuses names that cannot be one path component.
pub(crate) fn check_component(what: &'static str, value: &str) -> Result<(), BpfError> {
    let reason = if value.is_empty() {
        "empty"
    } else if value == "." || value == ".." {
        "not a name"
    } else if value.contains('/') || value.contains('\0') {
        "contains '/' or NUL"
    } else {
        return Ok(());
    };
    Err(BpfError::Invalid {
        what,
        value: value.to_owned(),
        reason,
    })
}

/// `mkdir -p`.
pub(crate) fn create_dir(dir: &Path) -> Result<(), BpfError> {
    fs::create_dir_all(dir).map_err(|source| BpfError::Io {
        action: "create",
        path: dir.to_path_buf(),
        source,
    })
}

/// Removes a file or pin; absent is fine.
pub(crate) fn remove_file(path: &Path) -> Result<(), BpfError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(BpfError::Io {
            action: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Removes a directory tree of pins; absent is fine. Links go first so that nothing is left
/// attached to a program whose pin is gone.
pub(crate) fn remove_tree(root: &Path) -> Result<(), BpfError> {
    let links = root.join("links");
    if links.is_dir() {
        for entry in read_dir(&links)? {
            remove_file(&entry)?;
        }
    }
    match fs::remove_dir_all(root) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(BpfError::Io {
            action: "remove",
            path: root.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The entries of a directory, sorted.
pub(crate) fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, BpfError> {
    let io = |source| BpfError::Io {
        action: "read",
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        entries.push(entry.map_err(io)?.path());
    }
    entries.sort();
    Ok(entries)
}

/// The layouts of every node with pinned maps under `<bpffs>/skiff/`; none when there is no
/// such directory.
pub fn node_layouts(bpffs: &Path) -> Result<Vec<PinLayout>, BpfError> {
    let skiff = bpffs.join("skiff");
    if !skiff.is_dir() {
        return Ok(Vec::new());
    }
    let mut layouts = Vec::new();
    for dir in read_dir(&skiff)? {
        let Some(node) = dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let layout = PinLayout::new(bpffs, node)?;
        if layout.maps_dir().is_dir() {
            layouts.push(layout);
        }
    }
    Ok(layouts)
}

/// The capacity of the map pinned at `path`.
pub(crate) fn pinned_map_size(path: &Path) -> Result<u32, BpfError> {
    let map = aya::maps::MapData::from_pin(path).map_err(|source| BpfError::Map {
        map: "pinned map",
        action: format!("open {}", path.display()),
        source: Box::new(source),
    })?;
    let info = map.info().map_err(|source| BpfError::Map {
        map: "pinned map",
        action: format!("read the info of {}", path.display()),
        source: Box::new(source),
    })?;
    Ok(info.max_entries())
}

/// Whether `path` is a bpffs mount point's file system.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts bpffs at `path` unless a bpffs is already there (idempotent).
pub fn ensure_bpffs(path: &Path) -> Result<(), BpfError> {
    if is_bpffs(path) {
        return Ok(());
    }
    create_dir(path)?;
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RELATIME,
        Some("mode=0700"),
    )
    .map_err(|source| BpfError::Mount {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_paths() {
        let l = PinLayout::new(Path::new("/sys/fs/bpf"), "node-1").expect("valid");
        assert_eq!(l.root(), Path::new("/sys/fs/bpf/skiff/node-1"));
        assert_eq!(l.maps_dir(), Path::new("/sys/fs/bpf/skiff/node-1/maps"));
        assert_eq!(
            l.link_pin("skf0123456789a", Hook::Egress),
            Path::new("/sys/fs/bpf/skiff/node-1/links/skf0123456789a-egress")
        );
    }

    #[test]
    fn node_names_that_escape_are_refused() {
        for bad in ["", ".", "..", "a/b", "a\0"] {
            let err = PinLayout::new(Path::new("/sys/fs/bpf"), bad).expect_err(bad);
            assert!(
                matches!(
                    err,
                    BpfError::Invalid {
                        what: "node name",
                        ..
                    }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn no_skiff_dir_means_no_nodes() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(node_layouts(dir.path()).expect("read").is_empty());
        fs::create_dir_all(dir.path().join("skiff/n1/maps")).expect("mkdir");
        fs::create_dir_all(dir.path().join("skiff/half")).expect("mkdir");
        let nodes = node_layouts(dir.path()).expect("read");
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].node(), "n1");
    }

    #[test]
    fn remove_tree_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = PinLayout::new(dir.path(), "n").expect("valid");
        l.create_dirs().expect("create");
        fs::write(l.link_pin("skfx", Hook::Ingress), b"").expect("write");
        remove_tree(l.root()).expect("remove");
        assert!(!l.root().exists());
        remove_tree(l.root()).expect("again");
    }
}
