//! The agent's containerd client: images (already in containerd, there is
//! no registry), containers with an OCI spec the agent builds, snapshots
//! prepared from the image's chain ID (overlayfs), tasks with their output
//! to a log file (the runc shim's `file://` stdio), exec'd processes for
//! probes, kill, wait and removal. Everything lives in one containerd
//! namespace (`--containerd-namespace`), and every container carries labels
//! ([`LABEL_NODE`], [`LABEL_POD_UID`], …) so that a restarted agent finds
//! what it started.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::container::Runtime as ContainerRuntime;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::services::v1::{
    CloseIoRequest, Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteProcessRequest, DeleteTaskRequest, ExecProcessRequest, GetContainerRequest,
    GetImageRequest, GetRequest, KillRequest, ListContainersRequest, ReadContentRequest,
    ResizePtyRequest, StartRequest, WaitRequest, containers_client::ContainersClient,
    content_client::ContentClient, images_client::ImagesClient, tasks_client::TasksClient,
    version_client::VersionClient,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::Mount;
use futures::StreamExt;
use jiff::Timestamp;
use prost_types::Any;
use serde_json::Value;

use super::spec::ImageConfig;

/// Label: the node that runs the container.
pub const LABEL_NODE: &str = "io.skiff.node";
/// Label: the pod's uid.
pub const LABEL_POD_UID: &str = "io.skiff.pod.uid";
/// Label: the pod's namespace.
pub const LABEL_POD_NAMESPACE: &str = "io.skiff.pod.namespace";
/// Label: the pod's name.
pub const LABEL_POD_NAME: &str = "io.skiff.pod.name";
/// Label: the container's name in the pod.
pub const LABEL_CONTAINER: &str = "io.skiff.container.name";
/// Label: how many times the container was restarted before this one.
pub const LABEL_RESTART: &str = "io.skiff.container.restart";
/// Label: when the container was started (RFC 3339), for adoption.
pub const LABEL_STARTED: &str = "io.skiff.container.started";

/// The runc shim containerd runs containers with.
const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
const PROCESS_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// Errors talking to containerd.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The socket could not be reached.
    #[error("cannot connect to containerd at {address}")]
    Connect {
        /// The socket.
        address: PathBuf,
        /// The cause.
        #[source]
        source: containerd_client::tonic::transport::Error,
    },
    /// A call failed.
    #[error("containerd {what} {id}: {}", source.message())]
    Call {
        /// The call.
        what: &'static str,
        /// The object it was about.
        id: String,
        /// The gRPC status.
        #[source]
        source: Status,
    },
    /// The image is not in containerd.
    #[error(
        "image {image:?} not found in containerd namespace {namespace:?} (no registry: import it, e.g. cargo xtask image then ctr -n {namespace} images import)"
    )]
    ImageNotFound {
        /// The image.
        image: String,
        /// The containerd namespace.
        namespace: String,
    },
    /// The image's manifest or config is not usable.
    #[error("image {image:?} is not usable: {message}")]
    BadImage {
        /// The image.
        image: String,
        /// What is wrong.
        message: String,
    },
}

impl RuntimeError {
    /// Whether containerd said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RuntimeError::Call { source, .. } if source.code() == Code::NotFound)
    }
}

/// An image in containerd.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// Its name.
    pub name: String,
    /// The config digest (`imageID`).
    pub id: String,
    /// The manifest digest.
    pub digest: String,
    /// The chain ID of its layers: the snapshot to prepare from.
    pub chain_id: String,
    /// How to run it.
    pub config: ImageConfig,
}

/// A task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskState {
    /// The init process.
    pub pid: u32,
    /// Whether it runs.
    pub running: bool,
    /// Its exit status (when stopped).
    pub exit_status: u32,
    /// When it exited (when stopped).
    pub exited_at: Option<Timestamp>,
}

/// Where an exec'd process's stdio goes: FIFOs the shim opens (`None`: not
/// attached), and whether it gets a terminal (then stderr goes to stdout).
#[derive(Debug, Clone, Default)]
pub struct ExecStdio {
    /// The FIFO the shim reads the process's stdin from.
    pub stdin: Option<PathBuf>,
    /// The FIFO the shim writes the process's stdout to.
    pub stdout: Option<PathBuf>,
    /// The FIFO the shim writes the process's stderr to.
    pub stderr: Option<PathBuf>,
    /// A pseudo-terminal for the process.
    pub terminal: bool,
}

/// A container found in containerd.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    /// Its containerd ID.
    pub id: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Its image name.
    pub image: String,
}

/// The chain ID of layers with `diff_ids` (OCI image spec).
pub fn chain_id(diff_ids: &[String]) -> Option<String> {
    let mut chain: Option<String> = None;
    for diff in diff_ids {
        chain = Some(match chain {
            None => diff.clone(),
            Some(parent) => skiff_image::sha256_digest(format!("{parent} {diff}").as_bytes()),
        });
    }
    chain
}

fn timestamp(t: Option<prost_types::Timestamp>) -> Option<Timestamp> {
    let t = t?;
    if t.seconds <= 0 {
        return None;
    }
    Timestamp::new(t.seconds, t.nanos).ok()
}

/// A containerd connection bound to one namespace.
#[derive(Debug, Clone)]
pub struct Runtime {
    channel: Channel,
    namespace: String,
    snapshotter: String,
}

impl Runtime {
    /// Connect to containerd's socket (no call is made yet).
    pub async fn connect(address: &Path, namespace: &str) -> Result<Runtime, RuntimeError> {
        let channel = containerd_client::connect(address)
            .await
            .map_err(|source| RuntimeError::Connect {
                address: address.to_path_buf(),
                source,
            })?;
        Ok(Runtime {
            channel,
            namespace: namespace.to_string(),
            snapshotter: "overlayfs".to_string(),
        })
    }

    /// The containerd namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Ok(value) = self.namespace.parse() {
            request.metadata_mut().insert("containerd-namespace", value);
        }
        request
    }

    fn call(what: &'static str, id: &str) -> impl FnOnce(Status) -> RuntimeError {
        let id = id.to_string();
        move |source| RuntimeError::Call { what, id, source }
    }

    /// containerd's version.
    pub async fn version(&self) -> Result<String, RuntimeError> {
        let response = VersionClient::new(self.channel.clone())
            .version(Request::new(()))
            .await
            .map_err(Self::call("version", ""))?;
        Ok(response.into_inner().version)
    }

    async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, RuntimeError> {
        let mut stream = ContentClient::new(self.channel.clone())
            .read(self.request(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(Self::call("read content", digest))?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            data.extend(chunk.map_err(Self::call("read content", digest))?.data);
        }
        Ok(data)
    }

    /// Look `name` up and read its config.
    pub async fn image(&self, name: &str) -> Result<ImageInfo, RuntimeError> {
        let response = ImagesClient::new(self.channel.clone())
            .get(self.request(GetImageRequest {
                name: name.to_string(),
            }))
            .await;
        let image = match response {
            Ok(r) => r.into_inner().image,
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => return Err(Self::call("get image", name)(status)),
        };
        let not_found = || RuntimeError::ImageNotFound {
            image: name.to_string(),
            namespace: self.namespace.clone(),
        };
        let target = image.and_then(|i| i.target).ok_or_else(not_found)?;
        let bad = |message: String| RuntimeError::BadImage {
            image: name.to_string(),
            message,
        };
        let mut digest = target.digest.clone();
        let mut manifest: Value = serde_json::from_slice(&self.read_blob(&digest).await?)
            .map_err(|e| bad(format!("manifest: {e}")))?;
        if manifest["manifests"].is_array() {
            // An index: the linux/amd64 manifest.
            let chosen = manifest["manifests"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| {
                    m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64"
                })
                .and_then(|m| m["digest"].as_str())
                .ok_or_else(|| bad("no linux/amd64 manifest in its index".into()))?
                .to_string();
            digest = chosen;
            manifest = serde_json::from_slice(&self.read_blob(&digest).await?)
                .map_err(|e| bad(format!("manifest: {e}")))?;
        }
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| bad("manifest without config".into()))?
            .to_string();
        let config: Value = serde_json::from_slice(&self.read_blob(&config_digest).await?)
            .map_err(|e| bad(format!("config: {e}")))?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_str().map(str::to_string))
            .collect();
        let chain_id = chain_id(&diff_ids).ok_or_else(|| bad("no layers".into()))?;
        Ok(ImageInfo {
            name: name.to_string(),
            id: config_digest,
            digest,
            chain_id,
            config: ImageConfig::from_oci(&config),
        })
    }

    /// Create container `id` from `image` with `spec` and `labels`, its
    /// snapshot, and its task (created, not started) writing stdout and
    /// stderr to `log`. Returns the task's pid.
    pub async fn create(
        &self,
        id: &str,
        image: &ImageInfo,
        spec: &Value,
        labels: HashMap<String, String>,
        log: &Path,
    ) -> Result<u32, RuntimeError> {
        let container = Container {
            id: id.to_string(),
            labels,
            image: image.name.clone(),
            runtime: Some(ContainerRuntime {
                name: RUNC_RUNTIME.to_string(),
                options: None,
            }),
            spec: Some(Any {
                type_url: SPEC_TYPE.to_string(),
                value: serde_json::to_vec(spec).expect("json"),
            }),
            snapshotter: self.snapshotter.clone(),
            snapshot_key: id.to_string(),
            ..Default::default()
        };
        ContainersClient::new(self.channel.clone())
            .create(self.request(CreateContainerRequest {
                container: Some(container),
            }))
            .await
            .map_err(Self::call("create container", id))?;
        let mounts = match self.prepare_snapshot(id, &image.chain_id).await {
            Ok(m) => m,
            Err(error) => {
                let _ = self.remove(id).await;
                return Err(error);
            }
        };
        if let Some(dir) = log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let uri = format!("file://{}", log.display());
        let created = TasksClient::new(self.channel.clone())
            .create(self.request(CreateTaskRequest {
                container_id: id.to_string(),
                rootfs: mounts,
                stdin: String::new(),
                stdout: uri.clone(),
                stderr: uri,
                terminal: false,
                ..Default::default()
            }))
            .await;
        match created {
            Ok(r) => Ok(r.into_inner().pid),
            Err(status) => {
                let _ = self.remove(id).await;
                Err(Self::call("create task", id)(status))
            }
        }
    }

    async fn prepare_snapshot(&self, key: &str, parent: &str) -> Result<Vec<Mount>, RuntimeError> {
        let mut client = SnapshotsClient::new(self.channel.clone());
        let prepared = client
            .prepare(self.request(PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels: HashMap::new(),
            }))
            .await;
        match prepared {
            Ok(r) => Ok(r.into_inner().mounts),
            Err(status) if status.code() == Code::AlreadyExists => Ok(client
                .mounts(self.request(MountsRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: key.to_string(),
                }))
                .await
                .map_err(Self::call("snapshot mounts", key))?
                .into_inner()
                .mounts),
            Err(status) => Err(Self::call("prepare snapshot", key)(status)),
        }
    }

    /// Start container `id`'s task (or exec `exec_id` in it).
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, RuntimeError> {
        let response = TasksClient::new(self.channel.clone())
            .start(self.request(StartRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            }))
            .await
            .map_err(Self::call("start task", id))?;
        Ok(response.into_inner().pid)
    }

    /// Wait until the task (or exec) exits: its exit status and time.
    pub async fn wait(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(u32, Option<Timestamp>), RuntimeError> {
        let response = TasksClient::new(self.channel.clone())
            .wait(self.request(WaitRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            }))
            .await
            .map_err(Self::call("wait task", id))?
            .into_inner();
        Ok((response.exit_status, timestamp(response.exited_at)))
    }

    /// Send `signal` to the task's init process (all its processes with `all`).
    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), RuntimeError> {
        TasksClient::new(self.channel.clone())
            .kill(self.request(KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal,
                all,
            }))
            .await
            .map_err(Self::call("kill task", id))?;
        Ok(())
    }

    /// The task's state; `None` when the container has no task.
    pub async fn task(&self, id: &str) -> Result<Option<TaskState>, RuntimeError> {
        let response = TasksClient::new(self.channel.clone())
            .get(self.request(GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await;
        match response {
            Ok(r) => Ok(r.into_inner().process.map(|p| TaskState {
                pid: p.pid,
                // containerd.v1.types.Status: 1 created, 2 running, 3 stopped, 4 paused, 5 pausing.
                running: matches!(p.status, 1 | 2 | 4 | 5),
                exit_status: p.exit_status,
                exited_at: timestamp(p.exited_at),
            })),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(Self::call("get task", id)(status)),
        }
    }

    /// Remove the container: its task (killed first if it runs), the
    /// container and its snapshot. What is already gone is skipped.
    pub async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(task) = self.task(id).await?
            && task.running
        {
            let _ = self.kill(id, 9, true).await;
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(10), self.wait(id, "")).await;
        }
        let mut tasks = TasksClient::new(self.channel.clone());
        match tasks
            .delete(self.request(DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await
        {
            Err(status) if status.code() != Code::NotFound => {
                return Err(Self::call("delete task", id)(status));
            }
            _ => {}
        }
        match ContainersClient::new(self.channel.clone())
            .delete(self.request(DeleteContainerRequest { id: id.to_string() }))
            .await
        {
            Err(status) if status.code() != Code::NotFound => {
                return Err(Self::call("delete container", id)(status));
            }
            _ => {}
        }
        match SnapshotsClient::new(self.channel.clone())
            .remove(self.request(RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: id.to_string(),
            }))
            .await
        {
            Err(status) if status.code() != Code::NotFound => {
                Err(Self::call("remove snapshot", id)(status))
            }
            _ => Ok(()),
        }
    }

    /// The containers carrying label `key` = `value`.
    pub async fn list(&self, key: &str, value: &str) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let filter = format!("labels.\"{key}\"=={value}");
        let response = ContainersClient::new(self.channel.clone())
            .list(self.request(ListContainersRequest {
                filters: vec![filter],
            }))
            .await
            .map_err(Self::call("list containers", value))?;
        Ok(response
            .into_inner()
            .containers
            .into_iter()
            .map(|c| ContainerInfo {
                id: c.id,
                labels: c.labels,
                image: c.image,
            })
            .collect())
    }

    /// Run `process` (an OCI process JSON) in container `id` as exec
    /// `exec_id`, wait for it, and return its exit status.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &Value,
    ) -> Result<u32, RuntimeError> {
        self.exec_create(id, exec_id, process, &ExecStdio::default())
            .await?;
        let result = async {
            self.start(id, exec_id).await?;
            self.wait(id, exec_id).await
        }
        .await;
        let _ = self.exec_delete(id, exec_id).await;
        result.map(|(status, _)| status)
    }

    /// Create exec `exec_id` in container `id` running `process` (an OCI
    /// process JSON) with `stdio`; [`Runtime::start`] starts it.
    pub async fn exec_create(
        &self,
        id: &str,
        exec_id: &str,
        process: &Value,
        stdio: &ExecStdio,
    ) -> Result<(), RuntimeError> {
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        TasksClient::new(self.channel.clone())
            .exec(self.request(ExecProcessRequest {
                container_id: id.to_string(),
                stdin: path(&stdio.stdin),
                stdout: path(&stdio.stdout),
                stderr: path(&stdio.stderr),
                terminal: stdio.terminal,
                spec: Some(Any {
                    type_url: PROCESS_TYPE.to_string(),
                    value: serde_json::to_vec(process).expect("json"),
                }),
                exec_id: exec_id.to_string(),
            }))
            .await
            .map_err(Self::call("exec", id))?;
        Ok(())
    }

    /// Remove exec `exec_id` of container `id` (after it exited).
    pub async fn exec_delete(&self, id: &str, exec_id: &str) -> Result<(), RuntimeError> {
        TasksClient::new(self.channel.clone())
            .delete_process(self.request(DeleteProcessRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            }))
            .await
            .map_err(Self::call("delete exec", id))?;
        Ok(())
    }

    /// Send `signal` to exec `exec_id` of container `id`.
    pub async fn exec_kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
    ) -> Result<(), RuntimeError> {
        TasksClient::new(self.channel.clone())
            .kill(self.request(KillRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                signal,
                all: false,
            }))
            .await
            .map_err(Self::call("kill exec", id))?;
        Ok(())
    }

    /// Resize the terminal of exec `exec_id` of container `id`.
    pub async fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), RuntimeError> {
        TasksClient::new(self.channel.clone())
            .resize_pty(self.request(ResizePtyRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                width,
                height,
            }))
            .await
            .map_err(Self::call("resize terminal", id))?;
        Ok(())
    }

    /// Close the stdin of exec `exec_id` of container `id` (what a closed
    /// terminal input needs; without a terminal closing the FIFO is enough).
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), RuntimeError> {
        TasksClient::new(self.channel.clone())
            .close_io(self.request(CloseIoRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                stdin: true,
            }))
            .await
            .map_err(Self::call("close stdin", id))?;
        Ok(())
    }

    /// Container `id`'s OCI spec.
    pub async fn spec(&self, id: &str) -> Result<Value, RuntimeError> {
        let container = ContainersClient::new(self.channel.clone())
            .get(self.request(GetContainerRequest { id: id.to_string() }))
            .await
            .map_err(Self::call("get container", id))?
            .into_inner()
            .container
            .unwrap_or_default();
        let spec = container.spec.map(|s| s.value).unwrap_or_default();
        serde_json::from_slice(&spec).map_err(|e| RuntimeError::Call {
            what: "read spec",
            id: id.to_string(),
            source: Status::internal(e.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        assert_eq!(chain_id(&[]), None);
        assert_eq!(chain_id(&["sha256:a".into()]).as_deref(), Some("sha256:a"));
        let two = chain_id(&["sha256:a".into(), "sha256:b".into()]).expect("chain");
        assert_eq!(two, skiff_image::sha256_digest(b"sha256:a sha256:b"));
    }
}
