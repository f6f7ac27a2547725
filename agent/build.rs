//! Builds skiff's eBPF programs (`ebpf/skiff-ebpf`) for `bpfel-unknown-none` and leaves the
//! object at `$OUT_DIR/skiff-ebpf.o`, which `skiff_agent::bpf` embeds with
//! `aya::include_bytes_aligned!`.
//!
//! The programs need the nightly toolchain with `rust-src` (`-Z build-std=core`) and
//! `bpf-linker`; `cargo xtask setup` installs them. The nested cargo gets its own target
//! directory under `OUT_DIR` (sharing the outer one would deadlock on its lock) and a clean
//! environment: the outer build's `RUSTC`, `RUSTFLAGS`, `CARGO_*` and toolchain variables would
//! otherwise leak into it.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The toolchain the programs are built with.
const TOOLCHAIN: &str = "nightly";
/// The eBPF target (little-endian: every machine skiff runs on).
const TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf_root = manifest_dir.join("../ebpf");
    let program_dir = ebpf_root.join("skiff-ebpf");
    let common_dir = ebpf_root.join("skiff-ebpf-common");
    for path in [
        program_dir.join("Cargo.toml"),
        program_dir.join("Cargo.lock"),
        program_dir.join("src"),
        common_dir.join("Cargo.toml"),
        common_dir.join("src"),
    ] {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    println!("cargo::rerun-if-env-changed=PATH");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustup = find_tool("rustup").unwrap_or_else(|| missing("rustup is not on PATH"));
    let linker = find_tool("bpf-linker").unwrap_or_else(|| missing("bpf-linker is not installed"));
    check_nightly(&rustup);

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new(&rustup);
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "--release", "--locked"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(program_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    clean_env(&mut cmd);
    // bpf-linker is found through PATH by rustc.
    let mut path = OsString::from(linker.parent().expect("bpf-linker has a directory"));
    if let Some(old) = env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    cmd.env("PATH", path);
    // As aya-build does: the target architecture for aya-ebpf's bindings, BTF in the object.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH");
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            format!("--cfg=bpf_target_arch=\"{arch}\""),
            "-Cdebuginfo=2".to_owned(),
            "-Clink-arg=--btf".to_owned(),
        ]
        .join("\x1f"),
    );
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !status.success() {
        panic!(
            "building the eBPF programs in {} failed ({status}); if the toolchain is missing, run \
             `cargo xtask setup`",
            program_dir.display()
        );
    }
    let built = target_dir.join(TARGET).join("release").join("skiff-ebpf");
    let object = out_dir.join("skiff-ebpf.o");
    std::fs::copy(&built, &object).unwrap_or_else(|e| {
        panic!(
            "cannot copy {} to {}: {e}",
            built.display(),
            object.display()
        )
    });
}

/// Fails the build with the way out.
fn missing(what: &str) -> ! {
    panic!(
        "{what}: the eBPF programs need the {TOOLCHAIN} toolchain with rust-src and bpf-linker; \
         run `cargo xtask setup`"
    )
}

/// A tool on PATH, or in `$CARGO_HOME/bin` / `~/.cargo/bin` (where rustup and cargo install
/// put them, and which a build script's PATH may lack).
fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Fails early, with the way out, when nightly or its rust-src is missing.
fn check_nightly(rustup: &Path) {
    let mut cmd = Command::new(rustup);
    cmd.args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"]);
    clean_env(&mut cmd);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        missing(&format!("the {TOOLCHAIN} toolchain is not installed"));
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        missing(&format!(
            "the {TOOLCHAIN} toolchain has no rust-src component"
        ));
    }
}

/// Removes what the outer cargo set for its own build.
fn clean_env(cmd: &mut Command) {
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        // Kept: where cargo lives and how it reaches registries.
        let network = key == "CARGO_HOME"
            || [
                "CARGO_NET_",
                "CARGO_HTTP_",
                "CARGO_REGISTRIES_",
                "CARGO_REGISTRY_",
            ]
            .iter()
            .any(|p| key.starts_with(p));
        let outer = (key.starts_with("CARGO") && !network)
            || key.starts_with("RUSTC")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTDOC"
                    | "RUSTDOCFLAGS"
                    | "RUSTUP_TOOLCHAIN"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
            );
        if outer {
            cmd.env_remove(key);
        }
    }
}
