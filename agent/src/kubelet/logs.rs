//! Container logs for the kubelet API's `/containerLogs`.
//!
//! Each container instance writes stdout and stderr, raw and interleaved,
//! to `<root-dir>/pods/<uid>/logs/<container>/<restart>.log` (the runc
//! shim's `file://` stdio): the newest file is the current instance, the one
//! before it the previous (`previous=true`); older ones are pruned when a
//! container restarts.
//!
//! The files hold no timestamps, so `timestamps=true` is best effort: what
//! was in the file when the request came is stamped with the file's
//! modification time, what arrives while following with the time it is
//! read; `sinceSeconds`/`sinceTime` likewise skip a file last written before
//! the cutoff as a whole. `tailLines` reads the file backwards, `limitBytes`
//! caps the output, and `follow=true` streams what the container writes
//! (`tail -f`) until its instance ends, a newer instance starts, or the
//! client goes away.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Bytes;
use jiff::Timestamp;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use super::query::QueryError;
use super::runtime::Runtime;

/// How often a followed log is checked for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// How much is read at once.
const CHUNK: usize = 32 * 1024;

/// The query parameters of `/containerLogs`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// `follow`: stream until the container instance ends.
    pub follow: bool,
    /// `previous`: the instance before the newest.
    pub previous: bool,
    /// `tailLines`: only the last lines.
    pub tail_lines: Option<u64>,
    /// `limitBytes`: at most this many bytes.
    pub limit_bytes: Option<u64>,
    /// `timestamps`: each line prefixed with an RFC 3339 time (best effort).
    pub timestamps: bool,
    /// `sinceSeconds` or `sinceTime`, as a point in time.
    pub since: Option<Timestamp>,
}

/// Go's `strconv.ParseBool`, as the kubelet parses its query.
fn parse_bool(key: &str, value: &str) -> Result<bool, QueryError> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" | "" => Ok(false),
        _ => Err(QueryError::NotBoolean {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

impl LogOptions {
    /// Parse a query string (`now` for `sinceSeconds`).
    pub fn parse(query: Option<&str>, now: Timestamp) -> Result<LogOptions, QueryError> {
        let mut options = LogOptions::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let number = || {
                value.parse::<i64>().map_err(|_| QueryError::NotInteger {
                    key: key.to_string(),
                    value: value.to_string(),
                })
            };
            match key.as_ref() {
                "follow" => options.follow = parse_bool(&key, &value)?,
                "previous" => options.previous = parse_bool(&key, &value)?,
                "timestamps" => options.timestamps = parse_bool(&key, &value)?,
                "tailLines" => {
                    let n = number()?;
                    if n < 0 {
                        return Err(QueryError::Negative { key: "tailLines" });
                    }
                    options.tail_lines = Some(n as u64);
                }
                "limitBytes" => {
                    let n = number()?;
                    if n < 1 {
                        return Err(QueryError::NotPositive { key: "limitBytes" });
                    }
                    options.limit_bytes = Some(n as u64);
                }
                "sinceSeconds" => {
                    let n = number()?;
                    if n < 1 {
                        return Err(QueryError::NotPositive {
                            key: "sinceSeconds",
                        });
                    }
                    options.since = Some(now - jiff::SignedDuration::from_secs(n));
                }
                "sinceTime" => {
                    options.since =
                        Some(
                            value
                                .parse::<Timestamp>()
                                .map_err(|e| QueryError::SinceTime {
                                    value: value.to_string(),
                                    reason: e.to_string(),
                                })?,
                        );
                }
                _ => {}
            }
        }
        Ok(options)
    }
}

/// The log files of one container (its log directory): restart number and
/// path, oldest first.
pub fn log_files(dir: &Path) -> Vec<(i32, PathBuf)> {
    let mut files: Vec<(i32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_suffix(".log")?.parse::<i32>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    files.sort();
    files
}

/// Remove the log files of instances before `keep_from`.
pub fn prune_logs(dir: &Path, keep_from: i32) {
    for (n, path) in log_files(dir) {
        if n < keep_from {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Where the last `lines` lines of `file` start (a last line without a
/// newline counts as a line).
pub fn tail_offset(file: &mut (impl Read + Seek), lines: u64) -> std::io::Result<u64> {
    let len = file.seek(SeekFrom::End(0))?;
    if lines == 0 {
        return Ok(len);
    }
    let mut end = len;
    if len > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] == b'\n' {
            end = len - 1;
        }
    }
    let mut found = 0u64;
    let mut pos = end;
    let mut buf = vec![0u8; CHUNK];
    while pos > 0 {
        let start = pos.saturating_sub(CHUNK as u64);
        let chunk = &mut buf[..(pos - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        for i in (0..chunk.len()).rev() {
            if chunk[i] == b'\n' {
                found += 1;
                if found == lines {
                    return Ok(start + i as u64 + 1);
                }
            }
        }
        pos = start;
    }
    Ok(0)
}

/// Prefixes each line with a time.
#[derive(Debug)]
pub struct Stamper {
    at_line_start: bool,
}

impl Default for Stamper {
    fn default() -> Self {
        Stamper {
            at_line_start: true,
        }
    }
}

impl Stamper {
    /// `data` with `at` before every line that starts in it.
    pub fn stamp(&mut self, data: &[u8], at: Timestamp) -> Vec<u8> {
        let prefix = format!("{at} ");
        let mut out = Vec::with_capacity(data.len() + prefix.len());
        for &byte in data {
            if self.at_line_start {
                out.extend_from_slice(prefix.as_bytes());
            }
            out.push(byte);
            self.at_line_start = byte == b'\n';
        }
        out
    }
}

/// What to stream.
#[derive(Debug, Clone)]
pub struct LogSource {
    /// The log file.
    pub path: PathBuf,
    /// The container's log directory (a newer file there ends a follow).
    pub dir: PathBuf,
    /// The instance's restart number.
    pub restart: i32,
    /// The instance's containerd ID (its end ends a follow).
    pub container_id: String,
}

/// Whether the instance still runs and is the newest.
async fn alive(runtime: &Runtime, source: &LogSource) -> bool {
    if log_files(&source.dir)
        .last()
        .is_some_and(|(n, _)| *n > source.restart)
    {
        return false;
    }
    match runtime.task(&source.container_id).await {
        Ok(Some(task)) => task.running,
        Ok(None) => false,
        // containerd unreachable: keep following.
        Err(_) => true,
    }
}

/// Stream `source` per `options` into `tx`, until done or `tx` is closed.
pub async fn stream(
    runtime: Runtime,
    source: LogSource,
    options: LogOptions,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    if let Err(error) = stream_inner(&runtime, &source, &options, &tx).await {
        tracing::debug!(path = %source.path.display(), error = %skiff_common::error::chain(&error), "log stream ended with an error");
        let _ = tx.send(Err(error)).await;
    }
}

async fn stream_inner(
    runtime: &Runtime,
    source: &LogSource,
    options: &LogOptions,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> std::io::Result<()> {
    let path = source.path.clone();
    let tail = options.tail_lines;
    let (start, len, modified) = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let modified = file
            .metadata()?
            .modified()
            .ok()
            .and_then(|m| Timestamp::try_from(m).ok())
            .unwrap_or_else(Timestamp::now);
        let len = file.seek(SeekFrom::End(0))?;
        let start = match tail {
            Some(n) => tail_offset(&mut file, n)?,
            None => 0,
        };
        Ok::<_, std::io::Error>((start, len, modified))
    })
    .await
    .map_err(std::io::Error::other)??;
    // A file last written before the cutoff has nothing after it.
    let start = match options.since {
        Some(since) if modified < since => len,
        _ => start,
    };
    let mut file = tokio::fs::File::open(&source.path).await?;
    file.seek(SeekFrom::Start(start)).await?;
    let mut position = start;
    let mut remaining = options.limit_bytes.unwrap_or(u64::MAX);
    let mut stamper = Stamper::default();
    let mut buf = vec![0u8; CHUNK];
    let mut ended = false;
    while remaining > 0 {
        let n = file.read(&mut buf).await?;
        if n > 0 {
            let at = if position < len {
                modified
            } else {
                Timestamp::now()
            };
            position += n as u64;
            let mut data = if options.timestamps {
                stamper.stamp(&buf[..n], at)
            } else {
                buf[..n].to_vec()
            };
            if data.len() as u64 > remaining {
                data.truncate(remaining as usize);
            }
            remaining -= data.len() as u64;
            if tx.send(Ok(Bytes::from(data))).await.is_err() {
                return Ok(());
            }
            continue;
        }
        if !options.follow || ended {
            return Ok(());
        }
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        // Read once more after the end: what was written before it.
        ended = !alive(runtime, source).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn offset(text: &str, lines: u64) -> String {
        let mut cursor = Cursor::new(text.as_bytes().to_vec());
        let at = tail_offset(&mut cursor, lines).expect("tail") as usize;
        text[at..].to_string()
    }

    #[test]
    fn tail_takes_the_last_lines() {
        assert_eq!(offset("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(offset("a\nb\nc\n", 1), "c\n");
        assert_eq!(offset("a\nb\nc", 1), "c");
        assert_eq!(offset("a\nb\nc", 2), "b\nc");
        assert_eq!(offset("a\nb\nc\n", 10), "a\nb\nc\n");
        assert_eq!(offset("a\nb\nc\n", 0), "");
        assert_eq!(offset("", 3), "");
        let long: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(offset(&long, 2), "line 9998\nline 9999\n");
    }

    #[test]
    fn stamps_go_before_each_line_across_chunks() {
        let at: Timestamp = "2026-01-02T03:04:05.5Z".parse().expect("time");
        let mut stamper = Stamper::default();
        let mut out = stamper.stamp(b"one\ntw", at);
        out.extend(stamper.stamp(b"o\nthree\n", at));
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "2026-01-02T03:04:05.5Z one\n2026-01-02T03:04:05.5Z two\n2026-01-02T03:04:05.5Z three\n"
        );
    }

    #[test]
    fn options_parse_like_the_kubelet() {
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().expect("time");
        let options = LogOptions::parse(
            Some("follow=true&tailLines=5&limitBytes=100&timestamps=1&previous=false&sinceSeconds=60"),
            now,
        )
        .expect("parses");
        assert_eq!(
            options,
            LogOptions {
                follow: true,
                previous: false,
                tail_lines: Some(5),
                limit_bytes: Some(100),
                timestamps: true,
                since: Some("2026-01-01T00:00:00Z".parse().expect("time")),
            }
        );
        assert_eq!(LogOptions::parse(None, now), Ok(LogOptions::default()));
        assert!(LogOptions::parse(Some("tailLines=-1"), now).is_err());
        assert!(LogOptions::parse(Some("limitBytes=0"), now).is_err());
        assert!(LogOptions::parse(Some("follow=maybe"), now).is_err());
        assert!(LogOptions::parse(Some("sinceTime=yesterday"), now).is_err());
    }

    #[test]
    fn log_files_sort_by_restart_and_prune_keeps_the_last_two() {
        let dir = tempfile::tempdir().expect("tempdir");
        for n in [0, 1, 2, 10] {
            std::fs::write(dir.path().join(format!("{n}.log")), "x").expect("write");
        }
        std::fs::write(dir.path().join("other"), "x").expect("write");
        let numbers = |d: &Path| log_files(d).into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(numbers(dir.path()), [0, 1, 2, 10]);
        prune_logs(dir.path(), 2);
        assert_eq!(numbers(dir.path()), [2, 10]);
    }
}
