//! `kubectl port-forward` on the agent: the kubelet's `portforward.k8s.io`
//! protocol over SPDY ([`super::spdy`]), on a connection upgraded with
//! `Upgrade: SPDY/3.1` or tunnelled in WebSocket binary messages
//! (subprotocol `SPDY/3.1+portforward.k8s.io`, kubectl 1.31+).
//!
//! For every local connection the client opens two streams with the same
//! `requestID` and `port` headers: `streamType: error`, then
//! `streamType: data`. Once both are there, the agent connects to
//! `localhost:<port>` inside the pod's network namespace (the node's for a
//! host-network pod) and copies bytes both ways over the data stream. When
//! the pod's side ends, the agent half-closes the data stream and closes
//! the error stream; a failure is written as text on the error stream
//! first, which kubectl prints. A pair whose second stream does not come
//! within 30 s fails the same way.
//!
//! The kubelet's WebSocket protocol (`v4.channel.k8s.io`, or none) is
//! served too: the ports come in the query (`port`, as the API server
//! passes them on, or `ports`), one connection each; port *i* has data
//! channel 2*i* and error channel 2*i*+1, every binary message starts with
//! its channel byte, and the agent's first message on each channel is the
//! port, 16-bit little-endian. The WebSocket closes when every port's
//! connection has ended.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::netns;
use super::query::QueryError;
use super::spdy::{self, PeerStream};

/// The stream protocol (`X-Stream-Protocol-Version`).
pub const PROTOCOL: &str = "portforward.k8s.io";
/// The WebSocket subprotocol that tunnels it.
pub const WEBSOCKET_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// The kubelet's own WebSocket port-forward protocol (binary channels),
/// which the official Python client speaks.
pub const CHANNEL_PROTOCOL: &str = "v4.channel.k8s.io";
/// How long the second stream of a pair may take, as upstream.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to the pod's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much is read from the pod at a time.
const READ_CHUNK: usize = 32 * 1024;

/// The pod whose ports are forwarded.
#[derive(Debug, Clone)]
pub struct Target {
    /// `namespace/name`, for messages.
    pub pod: String,
    /// The pod's uid.
    pub uid: String,
    /// The pod's network namespace; `None` for a host-network pod.
    pub netns: Option<PathBuf>,
}

impl Target {
    /// Upstream's message for a forward that failed with `cause`, logged.
    fn failure(&self, port: u16, cause: impl std::fmt::Display) -> String {
        let message = format!(
            "error forwarding port {port} to pod {}, uid {}: {cause}",
            self.pod, self.uid
        );
        tracing::info!(%message, "port-forward");
        message
    }
}

/// The two streams of one forwarded connection, as they arrive.
struct Pair {
    since: Instant,
    error: Option<PeerStream>,
    data: Option<PeerStream>,
}

/// Serve a WebSocket that tunnels SPDY: binary messages carry the SPDY
/// connection's bytes, in order, both ways.
pub async fn serve_websocket(socket: WebSocket, target: Target) {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let spdy = tokio::spawn(serve_spdy(ours, target));
    let (mut sink, mut messages) = socket.split();
    let (mut from_spdy, mut to_spdy) = tokio::io::split(theirs);
    let inbound = async {
        while let Some(message) = messages.next().await {
            match message {
                Ok(Message::Binary(bytes)) => {
                    if to_spdy.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = to_spdy.shutdown().await;
    };
    let outbound = async {
        let mut buffer = vec![0u8; READ_CHUNK];
        loop {
            match from_spdy.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let message = Message::Binary(Bytes::copy_from_slice(&buffer[..n]));
                    if sink.send(message).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    };
    // Either side ending ends the tunnel; the SPDY side then sees EOF.
    tokio::select! {
        () = inbound => {}
        () = outbound => {}
    }
    drop((from_spdy, to_spdy));
    let _ = spdy.await;
}

/// The ports of a channel-protocol request: every `port` and `ports`
/// query value, each possibly a comma-separated list.
pub fn query_ports(query: Option<&str>) -> Result<Vec<u16>, QueryError> {
    let mut ports = Vec::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if key != "port" && key != "ports" {
            continue;
        }
        for port in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => ports.push(p),
                _ => {
                    return Err(QueryError::Port {
                        port: port.to_string(),
                    });
                }
            }
        }
    }
    if ports.is_empty() {
        return Err(QueryError::NoPort);
    }
    Ok(ports)
}

/// Serve the kubelet's channel protocol on `socket` for `ports`.
pub async fn serve_channels(socket: WebSocket, target: Target, ports: Vec<u16>) {
    let (mut sink, mut messages) = socket.split();
    let (out, mut queued) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(message) = queued.recv().await {
            if sink.send(message).await.is_err() {
                return;
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    });
    let frame = |channel: usize, data: &[u8]| {
        let mut bytes = Vec::with_capacity(1 + data.len());
        bytes.push(channel as u8);
        bytes.extend_from_slice(data);
        Message::Binary(Bytes::from(bytes))
    };
    let mut inputs = Vec::new();
    let mut forwards = JoinSet::new();
    for (i, &port) in ports.iter().enumerate() {
        let (data, error) = (2 * i, 2 * i + 1);
        let _ = out.send(frame(data, &port.to_le_bytes())).await;
        let _ = out.send(frame(error, &port.to_le_bytes())).await;
        let (tx, mut from_client) = mpsc::channel::<Bytes>(16);
        inputs.push(tx);
        let (out, target) = (out.clone(), target.clone());
        forwards.spawn(async move {
            let connection = match connect(&target, port).await {
                Ok(c) => c,
                Err(cause) => {
                    let message = target.failure(port, skiff_common::error::chain(&cause));
                    let _ = out.send(frame(error, message.as_bytes())).await;
                    return;
                }
            };
            let (mut from_pod, mut to_pod) = connection.into_split();
            // The client's side ending only half-closes the pod's.
            let upstream = async {
                copy_to_pod(&mut from_client, &mut to_pod).await;
                std::future::pending::<()>().await;
            };
            let downstream = async {
                let sent = copy_from_pod(&mut from_pod, |bytes| {
                    let out = &out;
                    async move { out.send(frame(data, &bytes)).await.is_ok() }
                });
                if let Err(e) = sent.await {
                    let message = target.failure(port, format!("reading from the pod: {e}"));
                    let _ = out.send(frame(error, message.as_bytes())).await;
                }
            };
            // The pod's side ending ends this port's forward.
            tokio::select! {
                () = upstream => {}
                () = downstream => {}
            }
        });
    }
    drop(out);
    let reader = async {
        while let Some(message) = messages.next().await {
            let bytes = match message {
                Ok(Message::Binary(bytes)) => bytes,
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            let Some((&channel, data)) = bytes.split_first() else {
                continue;
            };
            let channel = usize::from(channel);
            if channel % 2 == 0
                && let Some(tx) = inputs.get(channel / 2)
                && !data.is_empty()
            {
                let _ = tx.send(bytes.slice(1..)).await;
            }
        }
    };
    // Until every port is done, or the client goes.
    tokio::select! {
        () = reader => forwards.abort_all(),
        () = async { while forwards.join_next().await.is_some() {} } => {}
    }
    while forwards.join_next().await.is_some() {}
    let _ = writer.await;
}

/// Serve one SPDY connection of the port-forward protocol until it ends.
pub async fn serve_spdy<IO>(io: IO, target: Target)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (streams, mut incoming) = mpsc::channel(16);
    let connection = tokio::spawn(spdy::serve(io, streams));
    let cancel = CancellationToken::new();
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut forwards = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            stream = incoming.recv() => match stream {
                Some(stream) => {
                    if let Some(pair) = accept(stream, &mut pairs).await {
                        let (target, cancel) = (target.clone(), cancel.clone());
                        forwards.spawn(async move {
                            tokio::select! {
                                () = forward(pair, &target) => {}
                                () = cancel.cancelled() => {}
                            }
                        });
                    }
                }
                None => break,
            },
            _ = tick.tick() => expire(&mut pairs).await,
            Some(_) = forwards.join_next(), if !forwards.is_empty() => {}
        }
    }
    // The connection is over: stop forwarding, let go of every stream.
    cancel.cancel();
    while forwards.join_next().await.is_some() {}
    drop(pairs);
    match connection.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::debug!(pod = %target.pod, error = %skiff_common::error::chain(&error), "port-forward connection ended")
        }
        Err(error) => {
            tracing::warn!(pod = %target.pod, error = %skiff_common::error::chain(&error), "port-forward connection task failed")
        }
    }
}

/// Check and answer a new stream, and file it with its pair; the pair once
/// complete.
async fn accept(
    stream: PeerStream,
    pairs: &mut HashMap<String, Pair>,
) -> Option<(PeerStream, PeerStream)> {
    if let Err(error) = check_headers(&stream) {
        let message = skiff_common::error::chain(&error);
        tracing::info!(stream = stream.id, %message, "port-forward stream refused");
        let _ = stream.out.reply(true).await;
        return None;
    }
    if stream.out.reply(false).await.is_err() {
        return None;
    }
    let is_error = stream.headers.get("streamType") == Some("error");
    // Clients before requestID sent the error stream, then the data stream
    // with the next (odd) id.
    let request = match stream.headers.get("requestID") {
        Some(id) => id.to_string(),
        None if is_error => stream.id.to_string(),
        None => stream.id.saturating_sub(2).to_string(),
    };
    let pair = pairs.entry(request.clone()).or_insert_with(|| Pair {
        since: Instant::now(),
        error: None,
        data: None,
    });
    let slot = if is_error {
        &mut pair.error
    } else {
        &mut pair.data
    };
    if slot.is_some() {
        tracing::info!(request, "port-forward request sent a stream type twice");
        let _ = stream.out.reset(spdy::PROTOCOL_ERROR).await;
        return None;
    }
    *slot = Some(stream);
    if pair.error.is_some() && pair.data.is_some() {
        let pair = pairs.remove(&request)?;
        return Some((pair.error?, pair.data?));
    }
    None
}

/// A port-forward stream whose headers upstream refuses, with its messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// No `streamType`.
    #[error("streamType header is required")]
    NoStreamType,
    /// A `streamType` other than `error` and `data`.
    #[error("invalid stream type {stream_type:?}")]
    StreamType {
        /// The value.
        stream_type: String,
    },
    /// No `port`.
    #[error("port header is required")]
    NoPort,
    /// A `port` that is not a port number.
    #[error("unable to parse {port:?} as a port")]
    Port {
        /// The value.
        port: String,
        /// Why it does not parse.
        #[source]
        source: std::num::ParseIntError,
    },
}

/// The headers a stream must have, with upstream's messages.
fn check_headers(stream: &PeerStream) -> Result<(), HeaderError> {
    match stream.headers.get("streamType") {
        None => return Err(HeaderError::NoStreamType),
        Some("error" | "data") => {}
        Some(other) => {
            return Err(HeaderError::StreamType {
                stream_type: other.to_string(),
            });
        }
    }
    let port = stream.headers.get("port").ok_or(HeaderError::NoPort)?;
    port.parse::<u16>().map_err(|source| HeaderError::Port {
        port: port.to_string(),
        source,
    })?;
    Ok(())
}

/// Fail the pairs still waiting for their second stream.
async fn expire(pairs: &mut HashMap<String, Pair>) {
    let late: Vec<String> = pairs
        .iter()
        .filter(|(_, p)| p.since.elapsed() > STREAM_CREATION_TIMEOUT)
        .map(|(id, _)| id.clone())
        .collect();
    for request in late {
        let Some(pair) = pairs.remove(&request) else {
            continue;
        };
        tracing::info!(
            request,
            "port-forward request timed out waiting for its streams"
        );
        if let Some(error) = &pair.error {
            let message = format!("timed out waiting for the data stream of request {request}");
            let _ = error.out.send(Bytes::from(message)).await;
            let _ = error.out.finish().await;
        }
        if let Some(data) = &pair.data {
            let _ = data.out.reset(spdy::CANCEL).await;
        }
    }
}

/// Connect to the pair's port in the pod and copy until both sides end.
async fn forward((error, data): (PeerStream, PeerStream), target: &Target) {
    // Nothing is read from the error stream: the client closes it at once.
    let PeerStream { out: error, .. } = error;
    let port: u16 = data
        .headers
        .get("port")
        .and_then(|p| p.parse().ok())
        .expect("checked on accept");
    let connection = match connect(target, port).await {
        Ok(c) => c,
        Err(cause) => {
            let message = target.failure(port, skiff_common::error::chain(&cause));
            let _ = error.send(Bytes::from(message)).await;
            let _ = error.finish().await;
            let _ = data.out.finish().await;
            return;
        }
    };
    tracing::debug!(pod = %target.pod, port, "port-forward connection");
    let (mut from_pod, mut to_pod) = connection.into_split();
    let PeerStream {
        data: mut from_client,
        out: to_client,
        ..
    } = data;
    // The client half-closing (or going) half-closes the pod's side.
    let upstream = copy_to_pod(&mut from_client, &mut to_pod);
    let downstream = async {
        let sent = copy_from_pod(&mut from_pod, |bytes| {
            let to_client = &to_client;
            async move { to_client.send(bytes).await.is_ok() }
        });
        match sent.await {
            Ok(true) => {}
            // The client is gone.
            Ok(false) => return,
            Err(e) => {
                let message = target.failure(port, format!("reading from the pod: {e}"));
                let _ = error.send(Bytes::from(message)).await;
            }
        }
        let _ = to_client.finish().await;
        let _ = error.finish().await;
    };
    tokio::join!(upstream, downstream);
}

/// Client → pod until the client's side ends, then half-close the pod's.
async fn copy_to_pod(from_client: &mut mpsc::Receiver<Bytes>, to_pod: &mut OwnedWriteHalf) {
    while let Some(bytes) = from_client.recv().await {
        if to_pod.write_all(&bytes).await.is_err() {
            break;
        }
    }
    let _ = to_pod.shutdown().await;
}

/// Pod → client through `send` until the pod's side ends (`Ok(true)`), the
/// client is gone (`send` says false: `Ok(false)`), or reading fails.
async fn copy_from_pod<F, Fut>(from_pod: &mut OwnedReadHalf, mut send: F) -> std::io::Result<bool>
where
    F: FnMut(Bytes) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut buffer = vec![0u8; READ_CHUNK];
    loop {
        match from_pod.read(&mut buffer).await? {
            0 => return Ok(true),
            n => {
                if !send(Bytes::copy_from_slice(&buffer[..n])).await {
                    return Ok(false);
                }
            }
        }
    }
}

/// Why the pod's port could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The thread that joins the pod's namespace failed.
    #[error("the connecting task failed")]
    Task {
        /// Its join error.
        #[source]
        source: tokio::task::JoinError,
    },
    /// Nothing answered on the port.
    #[error(transparent)]
    Connect(#[from] netns::NetnsError),
    /// The connection could not be handed to the runtime.
    #[error("cannot use the connection")]
    Use {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// A connection to `localhost:port` where the pod's ports are.
async fn connect(target: &Target, port: u16) -> Result<TcpStream, ConnectError> {
    let path = target.netns.clone();
    let stream =
        tokio::task::spawn_blocking(move || netns::connect(path.as_deref(), port, CONNECT_TIMEOUT))
            .await
            .map_err(|source| ConnectError::Task { source })??;
    let unusable = |source| ConnectError::Use { source };
    stream.set_nonblocking(true).map_err(unusable)?;
    TcpStream::from_std(stream).map_err(unusable)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::kubelet::spdy::Headers;
    use crate::kubelet::spdy::test_client::{Client, DATA, FIN, REPLY};

    fn headers(kind: &str, port: &str, request: &str) -> Headers {
        Headers(vec![
            ("streamType".into(), kind.into()),
            ("port".into(), port.into()),
            ("requestID".into(), request.into()),
        ])
    }

    fn host_network() -> Target {
        Target {
            pod: "ns/web".into(),
            uid: "uid-1".into(),
            netns: None,
        }
    }

    /// What the client reads until every stream in `until` has sent its
    /// FIN: the replies (id → FIN flag) and each stream's data.
    async fn read_until_fin(
        client: &mut Client,
        io: &mut (impl AsyncRead + Unpin),
        until: &[u32],
    ) -> (BTreeMap<u32, bool>, BTreeMap<u32, Vec<u8>>) {
        let (mut replies, mut data) = (BTreeMap::new(), BTreeMap::<u32, Vec<u8>>::new());
        let mut finished = Vec::new();
        while !until.iter().all(|id| finished.contains(id)) {
            let (kind, stream, flags, payload) =
                tokio::time::timeout(Duration::from_secs(10), client.read(io))
                    .await
                    .expect("a frame in time")
                    .expect("a frame");
            match kind {
                REPLY => {
                    replies.insert(stream, flags & FIN != 0);
                }
                DATA => {
                    data.entry(stream).or_default().extend(payload);
                    if flags & FIN != 0 {
                        finished.push(stream);
                    }
                }
                other => panic!("unexpected frame type {other} on stream {stream}"),
            }
        }
        (replies, data)
    }

    #[tokio::test]
    async fn a_pair_reaches_the_port_and_half_closes_both_ways() {
        // The pod's side: reads to the end, answers, closes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port().to_string();
        let pod = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            conn.read_to_end(&mut got).await.expect("read");
            conn.write_all(&[b"got: ", &got[..]].concat())
                .await
                .expect("write");
        });
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve_spdy(ours, host_network()));
        let mut client = Client::new();
        let mut frames = client.syn_stream(1, false, &headers("error", &port, "0"));
        frames.extend(Client::data(1, b"", true));
        frames.extend(client.syn_stream(3, false, &headers("data", &port, "0")));
        frames.extend(Client::data(3, b"hello", true));
        theirs.write_all(&frames).await.expect("write");
        let (replies, data) = read_until_fin(&mut client, &mut theirs, &[1, 3]).await;
        assert_eq!(replies, BTreeMap::from([(1, false), (3, false)]));
        assert_eq!(data.get(&3).map(Vec::as_slice), Some(&b"got: hello"[..]));
        assert!(data.get(&1).is_none_or(Vec::is_empty), "no error: {data:?}");
        pod.await.expect("the pod side");
        drop(theirs);
        server.await.expect("the connection ends with its client");
    }

    #[tokio::test]
    async fn a_port_nothing_listens_on_fails_on_the_error_stream() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address").port()
        };
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve_spdy(ours, host_network()));
        let mut client = Client::new();
        // Without requestID, as older clients: the pair is error id, data id + 2.
        let old_style = |kind: &str| {
            Headers(vec![
                ("streamType".into(), kind.into()),
                ("port".into(), port.to_string()),
            ])
        };
        let mut frames = client.syn_stream(5, false, &old_style("error"));
        frames.extend(client.syn_stream(7, false, &old_style("data")));
        theirs.write_all(&frames).await.expect("write");
        let (_, data) = read_until_fin(&mut client, &mut theirs, &[5, 7]).await;
        let message = String::from_utf8_lossy(&data[&5]).into_owned();
        assert!(
            message.starts_with(&format!(
                "error forwarding port {port} to pod ns/web, uid uid-1: cannot connect to localhost:{port} on the node"
            )),
            "{message}"
        );
        drop(theirs);
        server.await.expect("the connection ends with its client");
    }

    #[tokio::test]
    async fn streams_without_a_type_or_a_port_are_refused() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve_spdy(ours, host_network()));
        let mut client = Client::new();
        let mut frames = client.syn_stream(1, false, &Headers(vec![("port".into(), "80".into())]));
        frames.extend(client.syn_stream(3, false, &headers("data", "http", "1")));
        frames.extend(client.syn_stream(5, false, &headers("stdin", "80", "2")));
        theirs.write_all(&frames).await.expect("write");
        for id in [1, 3, 5] {
            let (kind, stream, flags, _) = client.read(&mut theirs).await.expect("a reply");
            assert_eq!(
                (kind, stream, flags & FIN != 0),
                (REPLY, id, true),
                "refused with a FIN reply"
            );
        }
        drop(theirs);
        server.await.expect("the connection ends with its client");
    }

    #[test]
    fn ports_come_from_port_or_ports_in_any_form() {
        assert_eq!(query_ports(Some("port=8080")), Ok(vec![8080]));
        assert_eq!(query_ports(Some("port=80&port=443")), Ok(vec![80, 443]));
        assert_eq!(query_ports(Some("ports=80%2C443")), Ok(vec![80, 443]));
        assert_eq!(query_ports(Some("ports=80,443&other=1")), Ok(vec![80, 443]));
        assert_eq!(
            query_ports(None).map_err(|e| e.to_string()),
            Err("query parameter \"port\" is required".to_string())
        );
        assert_eq!(
            query_ports(Some("port=http")).map_err(|e| e.to_string()),
            Err("unable to parse \"http\" as a port".to_string())
        );
        assert!(query_ports(Some("port=0")).is_err());
        assert!(query_ports(Some("port=70000")).is_err());
    }
}
