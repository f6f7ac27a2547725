//! `cargo xtask image`: write skiff's busybox OCI image archive (see the
//! `skiff-image` crate), by default to `target/skiff-busybox.oci.tar`, for
//! `ctr images import` and `skiffctl up`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

/// Flags of `cargo xtask image`.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Where to write the archive (default `<workspace>/target/skiff-busybox.oci.tar`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The busybox-static binary to package.
    #[arg(long, default_value = skiff_image::DEFAULT_BUSYBOX)]
    pub busybox: PathBuf,
}

/// The default archive path.
pub fn default_path(ws: &Path) -> PathBuf {
    ws.join("target").join("skiff-busybox.oci.tar")
}

/// Build the archive and print where it is and how to import it.
pub fn image(ws: &Path, args: &ImageArgs) -> Result<PathBuf> {
    let out = args.out.clone().unwrap_or_else(|| default_path(ws));
    let built = skiff_image::build_image(&args.busybox, &out)
        .with_context(|| format!("building {}", skiff_image::IMAGE_NAME))?;
    super::say(format!(
        "wrote {} ({} bytes): {} manifest {} config {}",
        built.path.display(),
        built.size,
        built.name,
        built.manifest_digest,
        built.config_digest
    ));
    super::say(format!(
        "import it with: ctr -a <containerd.sock> -n skiff images import {}",
        built.path.display()
    ));
    Ok(out)
}
