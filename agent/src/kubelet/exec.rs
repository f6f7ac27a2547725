//! `kubectl exec` on the agent: the Kubernetes WebSocket stream protocol
//! (`v5.channel.k8s.io`, `v4.channel.k8s.io`), or `v4.channel.k8s.io` over
//! SPDY/3.1 ([`spdy_session`]), over a containerd exec whose stdio are
//! FIFOs. One exec loop serves both transports ([`Output`], [`InputSource`]).
//!
//! Every binary WebSocket message starts with a channel byte: 0 stdin (from
//! the client), 1 stdout, 2 stderr, 3 error (one metav1 `Status` when the
//! command ends: `Success`, or `Failure` with reason `NonZeroExitCode` and
//! the exit code as cause `ExitCode`, which is how kubectl learns it), 4
//! terminal resize (`{"Width":…,"Height":…}` from the client); v5 adds 255,
//! close (`[255, 0]`: the client's stdin ended).
//!
//! The process runs as the container's own process does (its user, env,
//! working directory and capabilities from the container's OCI spec) with
//! the requested command. The FIFOs live in `<run-dir>/exec/<exec-id>/`;
//! each end is opened by a blocking thread (a FIFO open waits for its peer,
//! the shim), which also lets the end be released if the shim never comes.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::query::QueryError;
use super::runtime::{ExecStdio, Runtime};
use super::spdy::{self, PeerStream, StreamSender};

/// The stream protocols served, preferred first.
pub const PROTOCOLS: [&str; 2] = [PROTOCOL_V5, PROTOCOL_V4];
/// The protocol with the close channel.
pub const PROTOCOL_V5: &str = "v5.channel.k8s.io";
/// The protocol whose error channel carries a `Status`.
pub const PROTOCOL_V4: &str = "v4.channel.k8s.io";

/// Channel: stdin.
pub const STDIN: u8 = 0;
/// Channel: stdout.
pub const STDOUT: u8 = 1;
/// Channel: stderr.
pub const STDERR: u8 = 2;
/// Channel: the final status.
pub const ERROR: u8 = 3;
/// Channel: terminal resize.
pub const RESIZE: u8 = 4;
/// Channel (v5): close the channel named by the next byte.
pub const CLOSE: u8 = 255;

/// The stream protocol served over SPDY.
pub const SPDY_PROTOCOL: &str = PROTOCOL_V4;
/// How long the client may take to open its SPDY streams, as upstream.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// How long output may still drain after the process exited.
const DRAIN: Duration = Duration::from_secs(5);

/// The query of `/exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// `command` (repeated): the argv.
    pub command: Vec<String>,
    /// `stdin`.
    pub stdin: bool,
    /// `stdout`.
    pub stdout: bool,
    /// `stderr`.
    pub stderr: bool,
    /// `tty`.
    pub tty: bool,
}

impl ExecOptions {
    /// Parse the query string; a command and at least one stream are needed.
    pub fn parse(query: Option<&str>) -> Result<ExecOptions, QueryError> {
        let mut options = ExecOptions::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let flag = || matches!(value.as_ref(), "1" | "t" | "T" | "true" | "TRUE" | "True");
            match key.as_ref() {
                "command" => options.command.push(value.into_owned()),
                "input" | "stdin" => options.stdin = flag(),
                "output" | "stdout" => options.stdout = flag(),
                "error" | "stderr" => options.stderr = flag(),
                "tty" => options.tty = flag(),
                _ => {}
            }
        }
        if options.command.is_empty() {
            return Err(QueryError::NoCommand);
        }
        if !(options.stdin || options.stdout || options.stderr) {
            return Err(QueryError::NoStream);
        }
        if options.tty {
            // A terminal merges stderr into stdout, as upstream.
            options.stderr = false;
        }
        Ok(options)
    }
}

/// The metav1 `Status` ending a command: success, or its exit code.
pub fn exit_status(command: &[String], code: u32) -> Value {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"
        ),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
}

/// The metav1 `Status` of a command that could not run.
pub fn error_status(message: &str) -> Value {
    json!({
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    })
}

/// A terminal size from channel 4.
pub fn parse_resize(data: &[u8]) -> Option<(u32, u32)> {
    let value: Value = serde_json::from_slice(data).ok()?;
    let width = u32::try_from(value["Width"].as_u64()?).ok()?;
    let height = u32::try_from(value["Height"].as_u64()?).ok()?;
    Some((width, height))
}

/// One message on `channel`.
fn frame(channel: u8, data: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(data.len() + 1);
    bytes.push(channel);
    bytes.extend_from_slice(data);
    Message::Binary(Bytes::from(bytes))
}

/// A FIFO end opened by a blocking thread.
#[derive(Clone)]
struct FifoEnd {
    path: PathBuf,
    opened: Arc<AtomicBool>,
}

impl FifoEnd {
    fn create(dir: &Path, name: &str) -> std::io::Result<FifoEnd> {
        let path = dir.join(name);
        nix::unistd::mkfifo(
            &path,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .map_err(std::io::Error::from)?;
        Ok(FifoEnd {
            path,
            opened: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Unblock the thread's open if the shim never opened the other end:
    /// open both ends ourselves until the thread got through.
    fn release(&self) {
        if self.opened.load(Ordering::Acquire) {
            return;
        }
        let Ok(both) = OpenOptions::new().read(true).write(true).open(&self.path) else {
            return;
        };
        for _ in 0..100 {
            if self.opened.load(Ordering::Acquire) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(both);
    }
}

/// Read `fifo` in a blocking thread and send its chunks on `channel`.
fn spawn_reader(fifo: &FifoEnd, channel: u8, tx: mpsc::Sender<(u8, Bytes)>) {
    let path = fifo.path.clone();
    let opened = fifo.opened.clone();
    tokio::task::spawn_blocking(move || {
        let file = OpenOptions::new().read(true).open(&path);
        opened.store(true, Ordering::Release);
        let Ok(mut file) = file else {
            return;
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match file.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .blocking_send((channel, Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
}

/// Write what `rx` gives into `fifo` in a blocking thread; closing the
/// channel closes the FIFO (the shim keeps a writer of its own, so the
/// process sees the end of its stdin only after [`Runtime::close_stdin`]).
fn spawn_writer(fifo: &FifoEnd, mut rx: mpsc::Receiver<Bytes>) -> tokio::task::JoinHandle<()> {
    let path = fifo.path.clone();
    let opened = fifo.opened.clone();
    tokio::task::spawn_blocking(move || {
        let file = OpenOptions::new().write(true).open(&path);
        opened.store(true, Ordering::Release);
        let Ok(mut file) = file else {
            return;
        };
        while let Some(data) = rx.blocking_recv() {
            if file.write_all(&data).is_err() {
                return;
            }
        }
    })
}

/// End the process's stdin: close our end once written, give the shim a
/// moment to copy what is in the FIFO, then have it close its side.
async fn close_stdin(
    runtime: &Runtime,
    cid: &str,
    id: &str,
    in_tx: &mut Option<mpsc::Sender<Bytes>>,
    writer: &mut Option<tokio::task::JoinHandle<()>>,
) {
    if in_tx.take().is_none() {
        return;
    }
    if let Some(writer) = writer.take() {
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    if let Err(error) = runtime.close_stdin(cid, id).await {
        tracing::debug!(error = %skiff_common::error::chain(&error), "cannot close the exec's stdin");
    }
}

/// A unique exec ID.
fn exec_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "skiff-exec-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// What an exec session runs.
#[derive(Debug, Clone)]
pub struct ExecTarget {
    /// containerd.
    pub runtime: Runtime,
    /// The container's containerd ID.
    pub container_id: String,
    /// The container's OCI spec (its `process` is the template).
    pub spec: Value,
    /// Where the FIFOs go (`<run-dir>/exec`).
    pub fifo_dir: PathBuf,
}

/// What the client sends during an exec, whatever carries it.
#[derive(Debug)]
pub enum Input {
    /// Bytes for the process's stdin.
    Stdin(Bytes),
    /// The client's stdin ended.
    CloseStdin,
    /// The terminal's new size (width, height).
    Resize(u32, u32),
    /// The client went away.
    Gone,
}

/// Where an exec's output goes: the channels of [`STDOUT`], [`STDERR`] and
/// [`ERROR`] on the client's transport.
pub trait Output: Send {
    /// Send `data` on `channel`; false once the client is gone.
    fn send(&mut self, channel: u8, data: &[u8]) -> impl Future<Output = bool> + Send;
}

/// Where an exec's input comes from.
pub trait InputSource: Send {
    /// The next input; must be cancel-safe (it is raced against output).
    fn next(&mut self) -> impl Future<Output = Input> + Send;
}

struct WsOutput(WsTx);

impl Output for WsOutput {
    async fn send(&mut self, channel: u8, data: &[u8]) -> bool {
        self.0.send(frame(channel, data)).await.is_ok()
    }
}

struct WsInput {
    rx: WsRx,
    v5: bool,
}

impl InputSource for WsInput {
    async fn next(&mut self) -> Input {
        loop {
            match self.rx.next().await {
                Some(Ok(Message::Binary(data))) if !data.is_empty() => match data[0] {
                    STDIN => return Input::Stdin(data.slice(1..)),
                    RESIZE => {
                        if let Some((width, height)) = parse_resize(&data[1..]) {
                            return Input::Resize(width, height);
                        }
                    }
                    CLOSE if self.v5 && data.get(1) == Some(&STDIN) => return Input::CloseStdin,
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Input::Gone,
                Some(Ok(_)) => {}
            }
        }
    }
}

/// Run one `kubectl exec` over `socket` (already upgraded, with
/// `protocol` negotiated) and close it.
pub async fn session(target: ExecTarget, options: ExecOptions, socket: WebSocket, v5: bool) {
    let (ws_tx, ws_rx) = socket.split();
    let mut out = WsOutput(ws_tx);
    let mut input = WsInput { rx: ws_rx, v5 };
    let Some(status) = run_to_status(&target, &options, &mut out, &mut input).await else {
        return;
    };
    let WsOutput(mut ws_tx) = out;
    let _ = ws_tx
        .send(frame(ERROR, status.to_string().as_bytes()))
        .await;
    // A normal closure (1000): client-go takes anything else for an error.
    let _ = ws_tx
        .send(Message::Close(Some(CloseFrame {
            code: close_code::NORMAL,
            reason: Utf8Bytes::from_static(""),
        })))
        .await;
    // Let the client see the close before the connection drops.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(message)) = input.rx.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Run the exec (under a fresh id, its FIFOs in a directory of that name)
/// and give the `Status` that ends it; `None` when the client went away.
/// The FIFO directory is removed either way.
async fn run_to_status(
    target: &ExecTarget,
    options: &ExecOptions,
    out: &mut impl Output,
    input: &mut impl InputSource,
) -> Option<Value> {
    let id = exec_id();
    let dir = target.fifo_dir.join(&id);
    let result = run(target, options, &id, &dir, out, input).await;
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(Some(code)) => Some(exit_status(&options.command, code)),
        // The client went away.
        Ok(None) => None,
        Err(error) => {
            let message = skiff_common::error::chain(&error);
            tracing::info!(container = %target.container_id, %message, "exec failed");
            Some(error_status(&message))
        }
    }
}

/// The terminal sizes complete in `pending` (JSON objects one after
/// another, as client-go writes them on the `resize` stream), removed from
/// it; a partial object stays for the next chunk.
fn take_sizes(pending: &mut Vec<u8>) -> Vec<(u32, u32)> {
    let mut values = serde_json::Deserializer::from_slice(pending).into_iter::<Value>();
    let mut sizes = Vec::new();
    let mut used = 0;
    loop {
        match values.next() {
            Some(Ok(value)) => {
                used = values.byte_offset();
                if let Some(size) = parse_resize(value.to_string().as_bytes()) {
                    sizes.push(size);
                }
            }
            // Not JSON: nothing after it can be read either.
            Some(Err(error)) if !error.is_eof() => {
                used = pending.len();
                break;
            }
            _ => break,
        }
    }
    pending.drain(..used);
    sizes
}

/// The exec's streams on SPDY, by `streamType`.
struct SpdyOutput {
    stdout: Option<StreamSender>,
    stderr: Option<StreamSender>,
    error: StreamSender,
}

impl Output for SpdyOutput {
    async fn send(&mut self, channel: u8, data: &[u8]) -> bool {
        // SPDY streams need no opening frame.
        if data.is_empty() {
            return true;
        }
        let stream = match channel {
            STDOUT => self.stdout.as_ref(),
            STDERR => self.stderr.as_ref(),
            _ => Some(&self.error),
        };
        match stream {
            Some(stream) => stream.send(Bytes::copy_from_slice(data)).await.is_ok(),
            None => true,
        }
    }
}

struct SpdyInput(mpsc::Receiver<Input>);

impl InputSource for SpdyInput {
    async fn next(&mut self) -> Input {
        self.0.recv().await.unwrap_or(Input::Gone)
    }
}

/// The streams an exec over SPDY waits for.
#[derive(Default)]
struct SpdyStreams {
    error: Option<PeerStream>,
    stdin: Option<PeerStream>,
    stdout: Option<PeerStream>,
    stderr: Option<PeerStream>,
    resize: Option<PeerStream>,
}

impl SpdyStreams {
    fn complete(&self, options: &ExecOptions) -> bool {
        self.error.is_some()
            && self.stdin.is_some() == options.stdin
            && self.stdout.is_some() == options.stdout
            && self.stderr.is_some() == options.stderr
            && self.resize.is_some() == options.tty
    }
}

/// Run one exec over a SPDY connection (`X-Stream-Protocol-Version:
/// v4.channel.k8s.io`, what kubectl before 1.30 and client-go's SPDY
/// executor speak): the client opens an `error` stream and one per stream
/// the options ask for (`stdin`, `stdout`, `stderr`, and `resize` with a
/// terminal); stdin's FIN closes the process's stdin; `resize` carries
/// JSON sizes one after another; the `Status` goes on `error`, then every
/// stream is closed and so is the connection.
pub async fn spdy_session<IO>(target: ExecTarget, options: ExecOptions, io: IO)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (streams_tx, mut incoming) = mpsc::channel(8);
    let done = CancellationToken::new();
    let connection = tokio::spawn(spdy::serve_until(io, streams_tx, done.clone()));
    let mut streams = SpdyStreams::default();
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    while !streams.complete(&options) {
        let stream = tokio::select! {
            stream = incoming.recv() => stream,
            () = &mut deadline => None,
        };
        let Some(stream) = stream else {
            tracing::info!(container = %target.container_id, "exec over SPDY: the client's streams did not all come");
            if let Some(error) = &streams.error {
                let status = error_status("timed out waiting for the client to create its streams");
                let _ = error.out.send(Bytes::from(status.to_string())).await;
                let _ = error.out.finish().await;
            }
            drop(streams);
            done.cancel();
            let _ = connection.await;
            return;
        };
        let slot = match stream.headers.get("streamType") {
            Some("error") => &mut streams.error,
            Some("stdin") if options.stdin => &mut streams.stdin,
            Some("stdout") if options.stdout => &mut streams.stdout,
            Some("stderr") if options.stderr => &mut streams.stderr,
            Some("resize") if options.tty => &mut streams.resize,
            other => {
                tracing::info!(stream = ?other, "exec over SPDY: stream type not wanted");
                let _ = stream.out.reply(true).await;
                continue;
            }
        };
        if slot.is_some() {
            let _ = stream.out.reset(spdy::PROTOCOL_ERROR).await;
            continue;
        }
        let _ = stream.out.reply(false).await;
        *slot = Some(stream);
    }
    let SpdyStreams {
        error,
        stdin,
        stdout,
        stderr,
        resize,
    } = streams;
    let error = error.expect("complete");
    let (inputs, rx) = mpsc::channel(16);
    if let Some(mut stdin) = stdin {
        let inputs = inputs.clone();
        tokio::spawn(async move {
            while let Some(data) = stdin.data.recv().await {
                if inputs.send(Input::Stdin(data)).await.is_err() {
                    return;
                }
            }
            let _ = inputs.send(Input::CloseStdin).await;
        });
    }
    if let Some(mut resize) = resize {
        let inputs = inputs.clone();
        tokio::spawn(async move {
            let mut pending: Vec<u8> = Vec::new();
            while let Some(data) = resize.data.recv().await {
                pending.extend_from_slice(&data);
                for (width, height) in take_sizes(&mut pending) {
                    if inputs.send(Input::Resize(width, height)).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    // Streams opened after the set is complete are refused; the end of
    // the connection is the client's going.
    tokio::spawn(async move {
        while let Some(extra) = incoming.recv().await {
            let _ = extra.out.reset(spdy::REFUSED_STREAM).await;
        }
        let _ = inputs.send(Input::Gone).await;
    });
    let mut out = SpdyOutput {
        stdout: stdout.map(|s| s.out),
        stderr: stderr.map(|s| s.out),
        error: error.out,
    };
    let status = run_to_status(&target, &options, &mut out, &mut SpdyInput(rx)).await;
    if let Some(status) = status {
        let _ = out.error.send(Bytes::from(status.to_string())).await;
        for stream in [&out.stdout, &out.stderr].into_iter().flatten() {
            let _ = stream.finish().await;
        }
        let _ = out.error.finish().await;
    }
    drop(out);
    done.cancel();
    let _ = connection.await;
}

type WsTx = futures::stream::SplitSink<WebSocket, Message>;
type WsRx = futures::stream::SplitStream<WebSocket>;

/// Why an exec could not run (the message of the failure `Status`).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The fifo directory or a fifo could not be made.
    #[error("cannot create {what} in {}", dir.display())]
    Fifo {
        /// What (`the directory`, `a fifo`).
        what: &'static str,
        /// Where.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The container's OCI spec has no process to base the exec on.
    #[error("container {container} has no process in its spec")]
    NoProcess {
        /// The container.
        container: String,
    },
    /// containerd refused to create or start the exec.
    #[error(transparent)]
    Runtime(#[from] super::runtime::RuntimeError),
    /// Waiting for the process failed while the client was still there.
    #[error("lost track of the process")]
    Lost,
}

/// The exec itself: `Ok(Some(code))` when the process exited, `Ok(None)`
/// when the client went away (the process is killed), `Err` when it could
/// not run.
async fn run(
    target: &ExecTarget,
    options: &ExecOptions,
    id: &str,
    dir: &Path,
    out: &mut impl Output,
    input: &mut impl InputSource,
) -> Result<Option<u32>, ExecError> {
    let runtime = &target.runtime;
    let cid = target.container_id.as_str();
    let io = |what| {
        move |source| ExecError::Fifo {
            what,
            dir: dir.to_path_buf(),
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io("the directory"))?;
    let fifo = |name: &str| FifoEnd::create(dir, name).map_err(io("a fifo"));
    let stdin = options.stdin.then(|| fifo("stdin")).transpose()?;
    let stdout = options.stdout.then(|| fifo("stdout")).transpose()?;
    let stderr = options.stderr.then(|| fifo("stderr")).transpose()?;
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Bytes)>(16);
    if let Some(f) = &stdout {
        spawn_reader(f, STDOUT, out_tx.clone());
    }
    if let Some(f) = &stderr {
        spawn_reader(f, STDERR, out_tx.clone());
    }
    drop(out_tx);
    let mut in_tx = None;
    let mut writer = None;
    if let Some(f) = &stdin {
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        writer = Some(spawn_writer(f, rx));
        in_tx = Some(tx);
    }
    let ends: Vec<FifoEnd> = [&stdin, &stdout, &stderr]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let release = move || {
        let ends = ends.clone();
        tokio::task::spawn_blocking(move || {
            for f in &ends {
                f.release();
            }
        });
    };

    let mut process = target.spec["process"].clone();
    if !process.is_object() {
        release();
        return Err(ExecError::NoProcess {
            container: cid.to_string(),
        });
    }
    process["args"] = json!(options.command);
    process["terminal"] = json!(options.tty);
    let stdio = ExecStdio {
        stdin: stdin.as_ref().map(|f| f.path.clone()),
        stdout: stdout.as_ref().map(|f| f.path.clone()),
        stderr: stderr.as_ref().map(|f| f.path.clone()),
        terminal: options.tty,
    };
    if let Err(error) = runtime.exec_create(cid, id, &process, &stdio).await {
        release();
        return Err(error.into());
    }
    if let Err(error) = runtime.start(cid, id).await {
        let _ = runtime.exec_delete(cid, id).await;
        release();
        return Err(error.into());
    }
    // The lowest output channel opens the stream, as the kubelet does.
    let first = if options.stdout {
        STDOUT
    } else if options.stderr {
        STDERR
    } else {
        ERROR
    };
    out.send(first, &[]).await;

    let wait = runtime.wait(cid, id);
    tokio::pin!(wait);
    let mut client_gone = false;
    let mut outputs_done = false;
    let code = loop {
        tokio::select! {
            exited = &mut wait => match exited {
                Ok((code, _)) => break Some(code),
                Err(error) => {
                    tracing::warn!(container = %cid, exec = %id, error = %skiff_common::error::chain(&error), "cannot wait for the exec");
                    break None;
                }
            },
            chunk = out_rx.recv(), if !outputs_done => match chunk {
                Some((channel, data)) => {
                    if !out.send(channel, &data).await {
                        client_gone = true;
                        break None;
                    }
                }
                None => outputs_done = true,
            },
            next = input.next(), if !client_gone => match next {
                Input::Stdin(data) => {
                    if let Some(tx) = &in_tx
                        && tx.send(data).await.is_err()
                    {
                        in_tx = None;
                    }
                }
                Input::Resize(width, height) => {
                    if options.tty
                        && let Err(error) = runtime.resize_pty(cid, id, width, height).await
                    {
                        tracing::debug!(error = %skiff_common::error::chain(&error), "cannot resize the exec's terminal");
                    }
                }
                Input::CloseStdin => {
                    close_stdin(runtime, cid, id, &mut in_tx, &mut writer).await;
                }
                Input::Gone => {
                    client_gone = true;
                    break None;
                }
            },
        }
    };
    drop(in_tx);
    let Some(code) = code else {
        // The client left (or waiting failed): stop the process.
        let _ = runtime.exec_kill(cid, id, 9).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), runtime.wait(cid, id)).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), runtime.exec_delete(cid, id)).await;
        release();
        if client_gone {
            return Ok(None);
        }
        return Err(ExecError::Lost);
    };
    // What the process wrote before it exited.
    let _ = tokio::time::timeout(DRAIN, async {
        while let Some((channel, data)) = out_rx.recv().await {
            if !out.send(channel, &data).await {
                break;
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), runtime.exec_delete(cid, id)).await;
    release();
    Ok(Some(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_need_a_command_and_a_stream() {
        let options = ExecOptions::parse(Some(
            "command=sh&command=-c&command=echo+a+b&stdin=true&stdout=1&stderr=true",
        ))
        .expect("parses");
        assert_eq!(options.command, ["sh", "-c", "echo a b"]);
        assert!(options.stdin && options.stdout && options.stderr && !options.tty);
        let tty = ExecOptions::parse(Some("command=sh&stdout=true&stderr=true&tty=true"))
            .expect("parses");
        assert!(tty.tty && !tty.stderr, "a terminal merges stderr");
        assert!(ExecOptions::parse(Some("stdout=true")).is_err());
        assert!(ExecOptions::parse(Some("command=ls")).is_err());
    }

    #[test]
    fn statuses_carry_the_exit_code_as_kubectl_reads_it() {
        assert_eq!(
            exit_status(&["true".into()], 0),
            json!({"metadata": {}, "status": "Success"})
        );
        let failed = exit_status(&["sh".into(), "-c".into(), "exit 3".into()], 3);
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(
            failed["details"]["causes"],
            json!([{"reason": "ExitCode", "message": "3"}])
        );
        assert_eq!(error_status("boom")["reason"], "InternalError");
    }

    #[test]
    fn resize_streams_give_each_complete_size_once() {
        let mut pending = br#"{"Width":80,"Height":24}{"Width":100,"#.to_vec();
        assert_eq!(take_sizes(&mut pending), [(80, 24)]);
        assert_eq!(pending, br#"{"Width":100,"#);
        assert_eq!(take_sizes(&mut pending), []);
        pending.extend_from_slice(br#""Height":40} {"Width":1,"Height":2}"#);
        assert_eq!(take_sizes(&mut pending), [(100, 40), (1, 2)]);
        assert!(pending.is_empty(), "{pending:?}");
        let mut junk = b"]{\"Width\":1,\"Height\":2}".to_vec();
        assert_eq!(take_sizes(&mut junk), []);
        assert!(junk.is_empty(), "what is not JSON is dropped");
    }

    #[test]
    fn resize_messages_parse() {
        assert_eq!(parse_resize(br#"{"Width":80,"Height":24}"#), Some((80, 24)));
        assert_eq!(parse_resize(b"{}"), None);
        assert_eq!(parse_resize(b"junk"), None);
    }

    #[test]
    fn frames_start_with_their_channel() {
        assert_eq!(
            frame(STDOUT, b"hi"),
            Message::Binary(Bytes::from_static(b"\x01hi"))
        );
    }
}
