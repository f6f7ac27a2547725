//! SPDY/3.1 framing, the server side of what `kubectl port-forward` speaks
//! (client-go's `httpstream/spdy` over moby/spdystream), either on a
//! connection upgraded with `Upgrade: SPDY/3.1` or tunnelled in WebSocket
//! binary messages (`SPDY/3.1+portforward.k8s.io`).
//!
//! The peer opens every stream (odd ids, `SYN_STREAM`); the agent answers
//! each with `SYN_REPLY`, then both sides send `DATA` and half-close with
//! the FIN flag; `RST_STREAM` ends a stream at once. `PING`s are echoed.
//! Header blocks (`SYN_STREAM`, `SYN_REPLY`, `HEADERS`) are zlib streams,
//! one per direction for the whole connection, seeded with the dictionary
//! of the SPDY/3 specification. Like spdystream, no flow control: window
//! updates are read and ignored, and none are sent.
//!
//! Frame layout (all integers big-endian):
//! - control: `1 | version:15 | type:16`, `flags:8 | length:24`, payload;
//! - data: `0 | stream-id:31`, `flags:8 | length:24`, payload.

use std::collections::HashMap;
use std::sync::OnceLock;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The `Upgrade` token of a plain SPDY connection.
pub const UPGRADE: &str = "SPDY/3.1";

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const FLAG_FIN: u8 = 0x01;
/// The largest data frame the agent sends.
const MAX_DATA: usize = 32 * 1024;
/// The largest header block accepted, compressed or not.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Data frames buffered per stream before the connection's reader waits.
const STREAM_BUFFER: usize = 32;

/// `RST_STREAM` status: the frame broke the protocol.
pub const PROTOCOL_ERROR: u32 = 1;
/// `RST_STREAM` status: the stream was refused before any processing.
pub const REFUSED_STREAM: u32 = 3;
/// `RST_STREAM` status: the stream is no longer needed.
pub const CANCEL: u32 = 5;
/// `RST_STREAM` status: the stream id is already in use.
pub const STREAM_IN_USE: u32 = 8;

/// What ends a SPDY connection.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    /// Reading or writing the connection failed.
    #[error("spdy connection")]
    Io {
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer broke the framing.
    #[error("spdy protocol error: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
}

fn protocol(message: impl Into<String>) -> SpdyError {
    SpdyError::Protocol {
        message: message.into(),
    }
}

/// The header compression dictionary of SPDY/3 (draft 3, section
/// 2.6.10.1): each name and value of the first part length-prefixed
/// (32-bit), then the second part as is. 1,423 bytes, Adler-32 `e3c6a7c2`.
pub fn dictionary() -> &'static [u8] {
    const PREFIXED: [&str; 65] = [
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412",
        "413414415416417502504505203 Non-Authoritative Information204 No Con",
        "tent301 Moved Permanently400 Bad Request401 Unauthorized403 Forbidd",
        "en404 Not Found500 Internal Server Error501 Not Implemented503 Serv",
        "ice UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:",
        "00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image",
        "/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text",
        "/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharse",
        "t=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    );
    static DICTIONARY: OnceLock<Vec<u8>> = OnceLock::new();
    DICTIONARY.get_or_init(|| {
        let mut out = Vec::with_capacity(1423);
        for word in PREFIXED {
            out.extend_from_slice(&(word.len() as u32).to_be_bytes());
            out.extend_from_slice(word.as_bytes());
        }
        out.extend_from_slice(TAIL.as_bytes());
        out
    })
}

/// A header block: names (lowercase on the wire) and values; a value with
/// several entries has them separated by NUL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The first value of `name`, compared without regard to case.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split('\0').next().unwrap_or_default())
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        for (name, value) in &self.0 {
            let name = name.to_ascii_lowercase();
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    fn decode(block: &[u8]) -> Result<Headers, SpdyError> {
        let mut rest = block;
        let mut take = |n: usize| -> Result<&[u8], SpdyError> {
            if rest.len() < n {
                return Err(protocol("header block ends early"));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let u32_of = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let count = u32_of(take(4)?);
        let mut pairs = Vec::new();
        for _ in 0..count {
            let len = u32_of(take(4)?);
            let name = take(len)?.to_vec();
            let len = u32_of(take(4)?);
            let value = take(len)?.to_vec();
            let text =
                |b: Vec<u8>| String::from_utf8(b).map_err(|_| protocol("a header is not UTF-8"));
            pairs.push((text(name)?, text(value)?));
        }
        Ok(Headers(pairs))
    }
}

/// One direction's header compression state.
struct Deflater(Compress);

impl Deflater {
    fn new() -> Deflater {
        let mut compress = Compress::new(Compression::default(), true);
        compress
            .set_dictionary(dictionary())
            .expect("a fresh zlib stream takes a dictionary");
        Deflater(compress)
    }

    fn compress(&mut self, block: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(block.len() + 64);
        let start = self.0.total_in();
        loop {
            let consumed = (self.0.total_in() - start) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(block.len().max(64));
            }
            self.0
                .compress_vec(&block[consumed..], &mut out, FlushCompress::Sync)
                .expect("compressing to memory cannot fail");
            let done = (self.0.total_in() - start) as usize == block.len();
            // A sync flush has completed when it left spare room.
            if done && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

/// The other direction's.
struct Inflater(Decompress);

impl Inflater {
    fn new() -> Inflater {
        Inflater(Decompress::new(true))
    }

    fn decompress(&mut self, input: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity(input.len() * 4 + 64);
        let start = self.0.total_in();
        loop {
            let consumed = (self.0.total_in() - start) as usize;
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(protocol("header block too large"));
                }
                out.reserve(out.len());
            }
            let before = (self.0.total_in(), out.len());
            match self
                .0
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            {
                Ok(Status::StreamEnd) => return Err(protocol("header stream ended")),
                Ok(_) => {}
                Err(error) if error.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(dictionary())
                        .map_err(|e| protocol(format!("header dictionary refused: {e}")))?;
                    continue;
                }
                Err(error) => return Err(protocol(format!("header block: {error}"))),
            }
            let consumed = (self.0.total_in() - start) as usize;
            if consumed == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if (self.0.total_in(), out.len()) == before {
                return Err(protocol("header block does not decompress"));
            }
        }
    }
}

/// A frame as read.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    SynStream {
        stream: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    Ping {
        id: u32,
    },
    GoAway,
    Data {
        stream: u32,
        fin: bool,
        data: Bytes,
    },
    /// SYN_REPLY, HEADERS (their blocks decompressed, to keep the zlib
    /// stream in step), SETTINGS, WINDOW_UPDATE and unknown types.
    Ignored,
}

/// Reads frames off one direction of a connection.
struct FrameReader<R> {
    io: R,
    inflater: Inflater,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// The next frame; `None` at a clean end between frames.
    async fn next(&mut self) -> Result<Option<Frame>, SpdyError> {
        let mut head = [0u8; 8];
        match self.io.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(source) => return Err(SpdyError::Io { source }),
        }
        let flags = head[4];
        let length = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let control = head[0] & 0x80 != 0;
        if control && length > MAX_HEADER_BLOCK + 16 {
            return Err(protocol(format!("control frame of {length} bytes")));
        }
        let mut payload = vec![0u8; length];
        self.io
            .read_exact(&mut payload)
            .await
            .map_err(|source| SpdyError::Io { source })?;
        if !control {
            let stream = u32::from_be_bytes(head[0..4].try_into().expect("4 bytes")) & 0x7fff_ffff;
            return Ok(Some(Frame::Data {
                stream,
                fin: flags & FLAG_FIN != 0,
                data: Bytes::from(payload),
            }));
        }
        let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
        if version != VERSION {
            return Err(protocol(format!("SPDY version {version}, not 3")));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let word = |at: usize| -> Result<u32, SpdyError> {
            payload
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
                .ok_or_else(|| protocol(format!("control frame type {kind} is too short")))
        };
        let frame = match kind {
            SYN_STREAM => {
                let stream = word(0)? & 0x7fff_ffff;
                let block = payload
                    .get(10..)
                    .ok_or_else(|| protocol("SYN_STREAM is too short"))?;
                let headers = Headers::decode(&self.inflater.decompress(block)?)?;
                Frame::SynStream {
                    stream,
                    fin: flags & FLAG_FIN != 0,
                    headers,
                }
            }
            SYN_REPLY | HEADERS => {
                let block = payload
                    .get(4..)
                    .ok_or_else(|| protocol("header frame is too short"))?;
                self.inflater.decompress(block)?;
                Frame::Ignored
            }
            RST_STREAM => Frame::RstStream {
                stream: word(0)? & 0x7fff_ffff,
                status: word(4)?,
            },
            PING => Frame::Ping { id: word(0)? },
            GOAWAY => Frame::GoAway,
            _ => Frame::Ignored,
        };
        Ok(Some(frame))
    }
}

/// A frame the agent sends.
#[derive(Debug)]
enum Out {
    Reply { stream: u32, fin: bool },
    Data { stream: u32, data: Bytes, fin: bool },
    Reset { stream: u32, status: u32 },
    Ping { id: u32 },
}

fn control_frame(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32 | (u32::from(flags) << 24)).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn encode(out: &Out, deflater: &mut Deflater) -> Vec<u8> {
    match out {
        Out::Reply { stream, fin } => {
            let mut payload = stream.to_be_bytes().to_vec();
            payload.extend(deflater.compress(&Headers::default().encode()));
            control_frame(SYN_REPLY, if *fin { FLAG_FIN } else { 0 }, &payload)
        }
        Out::Data { stream, data, fin } => {
            let mut frame = Vec::with_capacity(8 + data.len());
            frame.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
            let flags = if *fin { FLAG_FIN } else { 0 };
            frame.extend_from_slice(&(data.len() as u32 | (u32::from(flags) << 24)).to_be_bytes());
            frame.extend_from_slice(data);
            frame
        }
        Out::Reset { stream, status } => {
            let mut payload = stream.to_be_bytes().to_vec();
            payload.extend_from_slice(&status.to_be_bytes());
            control_frame(RST_STREAM, 0, &payload)
        }
        Out::Ping { id } => control_frame(PING, 0, &id.to_be_bytes()),
    }
}

/// A stream the peer opened: its headers, what it sends, and the way back.
#[derive(Debug)]
pub struct PeerStream {
    /// The stream id.
    pub id: u32,
    /// The headers of its `SYN_STREAM`.
    pub headers: Headers,
    /// The data the peer sends; ends at its FIN, a reset, or the end of
    /// the connection.
    pub data: mpsc::Receiver<Bytes>,
    /// Frames to the peer on this stream.
    pub out: StreamSender,
}

/// Sends frames on one stream. Every method fails only when the
/// connection is gone.
#[derive(Debug, Clone)]
pub struct StreamSender {
    id: u32,
    frames: mpsc::Sender<Out>,
}

/// The connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the spdy connection is closed")]
pub struct Closed;

impl StreamSender {
    /// Answer the `SYN_STREAM`; `fin` refuses any data (a rejected stream).
    pub async fn reply(&self, fin: bool) -> Result<(), Closed> {
        self.send_frame(Out::Reply {
            stream: self.id,
            fin,
        })
        .await
    }

    /// Send `data`, in frames of at most 32 KiB.
    pub async fn send(&self, data: Bytes) -> Result<(), Closed> {
        let mut data = data;
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA));
            self.send_frame(Out::Data {
                stream: self.id,
                data: chunk,
                fin: false,
            })
            .await?;
        }
        Ok(())
    }

    /// Half-close: no more data from the agent on this stream.
    pub async fn finish(&self) -> Result<(), Closed> {
        self.send_frame(Out::Data {
            stream: self.id,
            data: Bytes::new(),
            fin: true,
        })
        .await
    }

    /// End the stream in both directions with `status`.
    pub async fn reset(&self, status: u32) -> Result<(), Closed> {
        self.send_frame(Out::Reset {
            stream: self.id,
            status,
        })
        .await
    }

    async fn send_frame(&self, frame: Out) -> Result<(), Closed> {
        self.frames.send(frame).await.map_err(|_| Closed)
    }
}

/// Serve one SPDY connection until the peer ends it (EOF or GOAWAY) or
/// breaks the protocol: each stream the peer opens goes to `streams`.
/// At the end, `streams` and every stream's data are closed at once; this
/// returns when the handler has dropped its [`StreamSender`]s and the
/// frames they queued are written.
pub async fn serve<IO>(io: IO, streams: mpsc::Sender<PeerStream>) -> Result<(), SpdyError>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    serve_until(io, streams, CancellationToken::new()).await
}

/// [`serve`], also ending when `done` is cancelled: the agent's side is
/// finished (a kubelet closes an exec's connection once it has sent the
/// status). Frames already queued are still written, then the write side
/// is shut down.
pub async fn serve_until<IO>(
    io: IO,
    streams: mpsc::Sender<PeerStream>,
    done: CancellationToken,
) -> Result<(), SpdyError>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, mut write) = tokio::io::split(io);
    let (frames, mut queued) = mpsc::channel::<Out>(64);
    let writer = tokio::spawn(async move {
        let mut deflater = Deflater::new();
        while let Some(out) = queued.recv().await {
            let bytes = encode(&out, &mut deflater);
            if let Err(source) = write.write_all(&bytes).await {
                return Err(SpdyError::Io { source });
            }
            if queued.is_empty()
                && let Err(source) = write.flush().await
            {
                return Err(SpdyError::Io { source });
            }
        }
        let _ = write.shutdown().await;
        Ok(())
    });
    let mut reader = FrameReader {
        io: read,
        inflater: Inflater::new(),
    };
    let mut open: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut last_seen = 0u32;
    let result = loop {
        let next = tokio::select! {
            next = reader.next() => next,
            () = done.cancelled() => break Ok(()),
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        };
        match frame {
            Frame::SynStream {
                stream,
                fin,
                headers,
            } => {
                let sender = StreamSender {
                    id: stream,
                    frames: frames.clone(),
                };
                if stream % 2 == 0 || stream <= last_seen {
                    let status = if open.contains_key(&stream) {
                        STREAM_IN_USE
                    } else {
                        PROTOCOL_ERROR
                    };
                    let _ = sender.reset(status).await;
                    continue;
                }
                last_seen = stream;
                let (tx, rx) = mpsc::channel(STREAM_BUFFER);
                if !fin {
                    open.insert(stream, tx);
                }
                let peer = PeerStream {
                    id: stream,
                    headers,
                    data: rx,
                    out: sender.clone(),
                };
                if streams.send(peer).await.is_err() {
                    open.remove(&stream);
                    let _ = sender.reset(REFUSED_STREAM).await;
                }
            }
            Frame::Data { stream, fin, data } => {
                if let Some(tx) = open.get(&stream) {
                    if !data.is_empty() && tx.send(data).await.is_err() {
                        // Its reader went away: nobody wants the rest.
                        open.remove(&stream);
                    }
                    if fin {
                        open.remove(&stream);
                    }
                }
            }
            Frame::RstStream { stream, .. } => {
                open.remove(&stream);
            }
            Frame::Ping { id } => {
                if frames.send(Out::Ping { id }).await.is_err() {
                    break Ok(());
                }
            }
            Frame::GoAway => break Ok(()),
            Frame::Ignored => {}
        }
    };
    // Tell the handler the connection is over (its streams' data has
    // ended), so it lets go of its senders.
    drop(streams);
    drop(open);
    drop(frames);
    // The writer ends once every sender (the streams' too) is dropped.
    match writer.await {
        Ok(Err(error)) if result.is_ok() => Err(error),
        _ => result,
    }
}

/// The peer's side of a connection, for tests here and of the protocols on
/// top.
#[cfg(test)]
pub(crate) mod test_client {
    use super::*;

    /// The frame kind [`Client::read`] gives a `SYN_REPLY`.
    pub(crate) const REPLY: u16 = SYN_REPLY;
    /// The frame kind it gives a data frame.
    pub(crate) const DATA: u16 = 0;
    /// The FIN flag.
    pub(crate) const FIN: u8 = FLAG_FIN;

    /// A client's side: frames with its own compressor.
    pub(crate) struct Client {
        deflater: Deflater,
        inflater: Inflater,
    }

    impl Client {
        /// A client with fresh header compression.
        pub(crate) fn new() -> Client {
            Client {
                deflater: Deflater::new(),
                inflater: Inflater::new(),
            }
        }

        /// A `SYN_STREAM` frame.
        pub(crate) fn syn_stream(&mut self, stream: u32, fin: bool, headers: &Headers) -> Vec<u8> {
            let mut payload = stream.to_be_bytes().to_vec();
            payload.extend_from_slice(&0u32.to_be_bytes());
            payload.extend_from_slice(&[0, 0]);
            payload.extend(self.deflater.compress(&headers.encode()));
            control_frame(SYN_STREAM, if fin { FLAG_FIN } else { 0 }, &payload)
        }

        /// A data frame.
        pub(crate) fn data(stream: u32, data: &[u8], fin: bool) -> Vec<u8> {
            encode(
                &Out::Data {
                    stream,
                    data: Bytes::copy_from_slice(data),
                    fin,
                },
                &mut Deflater::new(),
            )
        }

        /// Reads frames the server sent, decoding SYN_REPLY with this
        /// client's inflater.
        pub(crate) async fn read(
            &mut self,
            io: &mut (impl AsyncRead + Unpin),
        ) -> Option<(u16, u32, u8, Vec<u8>)> {
            let mut head = [0u8; 8];
            io.read_exact(&mut head).await.ok()?;
            let length = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
            let mut payload = vec![0u8; length];
            io.read_exact(&mut payload).await.expect("payload");
            if head[0] & 0x80 == 0 {
                let stream = u32::from_be_bytes(head[0..4].try_into().expect("4"));
                return Some((0, stream, head[4], payload));
            }
            let kind = u16::from_be_bytes([head[2], head[3]]);
            let stream = u32::from_be_bytes(payload[0..4].try_into().expect("4"));
            if kind == SYN_REPLY {
                let block = self
                    .inflater
                    .decompress(&payload[4..])
                    .expect("reply block");
                assert_eq!(
                    Headers::decode(&block).expect("headers"),
                    Headers::default()
                );
            }
            Some((kind, stream, head[4], payload))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_client::Client;
    use super::*;

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in data {
            a = (a + u32::from(byte)) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    #[test]
    fn the_dictionary_is_the_one_of_the_specification() {
        let dictionary = dictionary();
        assert_eq!(dictionary.len(), 1423);
        assert_eq!(adler32(dictionary), 0xe3c6_a7c2);
        assert_eq!(&dictionary[..11], b"\0\0\0\x07options");
        assert!(dictionary.ends_with(b",*,enq=0."));
    }

    #[test]
    fn header_blocks_survive_a_compressed_round_trip_in_order() {
        let (mut deflater, mut inflater) = (Deflater::new(), Inflater::new());
        let blocks = [
            Headers(vec![
                ("streamType".into(), "error".into()),
                ("port".into(), "8080".into()),
                ("requestID".into(), "0".into()),
            ]),
            Headers::default(),
            Headers(vec![("streamtype".into(), "data".into())]),
        ];
        for block in &blocks {
            let compressed = deflater.compress(&block.encode());
            let plain = inflater.decompress(&compressed).expect("decompress");
            let back = Headers::decode(&plain).expect("decode");
            assert_eq!(back.get("STREAMTYPE"), block.get("streamtype"));
            assert_eq!(back.0.len(), block.0.len());
            for (name, _) in &back.0 {
                assert_eq!(name, &name.to_ascii_lowercase(), "names go lowercase");
            }
        }
        // The first block says it needs the dictionary (zlib FDICT).
        let mut fresh = Deflater::new();
        let first = fresh.compress(&blocks[0].encode());
        assert_eq!(first[1] & 0x20, 0x20, "FDICT set");
        assert_eq!(&first[2..6], &0xe3c6_a7c2u32.to_be_bytes());
    }

    #[test]
    fn truncated_header_blocks_are_refused() {
        let block = Headers(vec![("port".into(), "80".into())]).encode();
        for cut in 0..block.len() {
            assert!(
                Headers::decode(&block[..cut]).is_err(),
                "cut at {cut} of {}",
                block.len()
            );
        }
    }

    #[tokio::test]
    async fn streams_open_carry_data_both_ways_and_half_close() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let (tx, mut rx) = mpsc::channel(4);
        let server = tokio::spawn(serve(ours, tx));
        let mut client = Client::new();
        let headers = Headers(vec![("streamType".into(), "data".into())]);
        theirs
            .write_all(&client.syn_stream(1, false, &headers))
            .await
            .expect("write");
        let mut stream = rx.recv().await.expect("a stream");
        assert_eq!(
            (stream.id, stream.headers.get("streamtype")),
            (1, Some("data"))
        );
        stream.out.reply(false).await.expect("reply");
        let (kind, id, flags, _) = client.read(&mut theirs).await.expect("reply frame");
        assert_eq!((kind, id, flags), (SYN_REPLY, 1, 0));

        theirs
            .write_all(&Client::data(1, b"hello", true))
            .await
            .expect("write");
        assert_eq!(stream.data.recv().await.as_deref(), Some(&b"hello"[..]));
        assert_eq!(stream.data.recv().await, None, "the FIN ends the data");

        let big = Bytes::from(vec![7u8; MAX_DATA + 10]);
        stream.out.send(big).await.expect("send");
        stream.out.finish().await.expect("finish");
        let mut got = Vec::new();
        loop {
            let (kind, id, flags, payload) = client.read(&mut theirs).await.expect("data");
            assert_eq!((kind, id), (0, 1));
            got.extend(payload);
            if flags & FLAG_FIN != 0 {
                break;
            }
        }
        assert_eq!(got.len(), MAX_DATA + 10);

        // A second stream with a fresh header block, and a ping echoed.
        theirs
            .write_all(&client.syn_stream(3, true, &Headers(vec![("port".into(), "80".into())])))
            .await
            .expect("write");
        let mut second = rx.recv().await.expect("a second stream");
        assert_eq!(second.headers.get("port"), Some("80"));
        assert_eq!(second.data.recv().await, None, "opened with FIN");
        theirs
            .write_all(&control_frame(PING, 0, &5u32.to_be_bytes()))
            .await
            .expect("ping");
        let (kind, id, _, _) = client.read(&mut theirs).await.expect("pong");
        assert_eq!((kind, id), (PING, 5));

        // A reused or even stream id is reset, and the connection goes on.
        theirs
            .write_all(&client.syn_stream(2, false, &Headers::default()))
            .await
            .expect("write");
        let (kind, id, _, payload) = client.read(&mut theirs).await.expect("reset");
        assert_eq!((kind, id), (RST_STREAM, 2));
        assert_eq!(&payload[4..8], &PROTOCOL_ERROR.to_be_bytes());

        drop((stream, second));
        theirs.shutdown().await.expect("close");
        drop(theirs);
        server.await.expect("join").expect("a clean end");
    }

    #[tokio::test]
    async fn a_broken_frame_ends_the_connection_with_an_error() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let (tx, _rx) = mpsc::channel(4);
        let server = tokio::spawn(serve(ours, tx));
        // Version 2 control frame.
        theirs
            .write_all(&[0x80, 0x02, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 1])
            .await
            .expect("write");
        let error = server
            .await
            .expect("join")
            .expect_err("version 2 is refused");
        assert!(error.to_string().contains("version 2"), "{error}");
    }
}
