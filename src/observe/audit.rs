//! The audit log: an append-only JSON-lines file of security-relevant
//! events, each record chained to the one before it.
//!
//! A record is one line:
//! `{"seq":7,"time":"...","event":"certificates.reload",...,"prev":"<hex>","hash":"<hex>"}`
//! where `hash` is the SHA-256 of the line up to (not including)
//! `,"hash":`, and `prev` is the `hash` of the record before it (64 zeros
//! for the first record ever). Changing a byte breaks that record's hash;
//! removing, inserting or reordering records breaks `seq` or `prev`, and
//! [`verify`] names the first line where that happens.
//!
//! The chain survives restarts (the writer continues from the file's last
//! record) and rotation (after a reopen, the new file's first record points
//! at the old file's last one). A `<file>.head` beside the log always holds
//! the last record's `seq` and `hash`, so cutting whole records off the end
//! is detected too. With an HMAC key, a signed `checkpoint` record follows
//! every N records and the head file is signed: whoever edits the log
//! without the key cannot forge either.
//!
//! Records are written by one thread, in order, flushed and synced one by
//! one. When a write fails (a full disk), the partial line is cut off
//! again (the file is truncated to its last whole record) and the record
//! waits in memory, with those after it, to be written in order once the
//! file takes writes again (tried every second), so an honest log always
//! verifies. Only if the failure outlasts a backlog of 65,536 records are
//! the oldest dropped, and then an `audit.records_lost` record, chained
//! like the others, says how many.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::SystemTime;

use aws_lc_rs::hmac;
use serde::Serialize;

use crate::config::AuditLogConfig;
use crate::secret::hex;

mod verify;

#[cfg(test)]
use verify::parse_line;
pub use verify::{Intact, Tampered, VerifyError, verify};

pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Everything the audit log records: one closed set, so the log, the
/// metrics and (later) the admin API share one vocabulary.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event")]
pub enum Event {
    #[serde(rename = "process.start")]
    ProcessStart { pid: u32, version: &'static str },
    #[serde(rename = "process.stop")]
    ProcessStop { pid: u32, reason: String },
    /// A config was loaded and is now in use.
    #[serde(rename = "config.load")]
    ConfigLoad {
        trigger: String,
        file: Option<String>,
        sha256: Option<String>,
        listeners: Vec<String>,
        routes: Vec<String>,
        upstreams: Vec<String>,
        certificates: Vec<CertificateSummary>,
        /// What changed from the config before (a reload).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        changes: Vec<crate::plan::Difference>,
    },
    /// A config reload failed; the running config stays in use.
    #[serde(rename = "config.reload_failed")]
    ConfigReloadFailed {
        trigger: String,
        file: Option<String>,
        errors: Vec<String>,
        /// What the refused config would have changed.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        changes: Vec<crate::plan::Difference>,
    },
    /// An operator's change to the running proxy (admin API), other than a
    /// reload (whose record is `config.load` / `config.reload_failed`).
    #[serde(rename = "change")]
    Change {
        caller: String,
        #[serde(flatten)]
        change: crate::change::Change,
        result: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// TLS certificates of a listener were reloaded (or failed to).
    #[serde(rename = "certificates.reload")]
    CertificatesReload {
        trigger: String,
        listener: String,
        result: String,
        added: Vec<String>,
        removed: Vec<String>,
        error: Option<String>,
    },
    /// An upstream server left the rotation.
    #[serde(rename = "upstream.server_ejected")]
    ServerEjected {
        upstream: String,
        server: String,
        reason: String,
    },
    /// An upstream server is back in rotation.
    #[serde(rename = "upstream.server_restored")]
    ServerRestored {
        upstream: String,
        server: String,
        reason: String,
    },
    /// Attack mode entered or left, with the detector's reasons.
    #[serde(rename = "protection.attack_mode")]
    AttackMode {
        state: String,
        mode: String,
        reasons: Vec<String>,
    },
    /// A client banned for a while (or, in shadow mode, that would be).
    #[serde(rename = "protection.ban")]
    Ban {
        client: String,
        mode: String,
        reason: String,
        seconds: u64,
    },
    /// An HMAC-SHA256 over `"<seq>:<prev>"` of this record.
    #[serde(rename = "checkpoint")]
    Checkpoint { mac: String },
    /// The gap marker: records that could not be written (the disk stayed
    /// full longer than the writer's backlog lasted) and were dropped. It
    /// is chained like any record, so the chain stays whole and says what
    /// is missing.
    #[serde(rename = "audit.records_lost")]
    RecordsLost { count: u64, reason: String },
}

/// The certificates one TLS listener serves (SHA-256 fingerprints).
#[derive(Debug, Clone, Serialize)]
pub struct CertificateSummary {
    pub listener: String,
    pub fingerprints: Vec<String>,
}

pub use crate::secret::sha256_hex;

fn mac_hex(key: &hmac::Key, message: &str) -> String {
    hex(hmac::sign(key, message.as_bytes()).as_ref())
}

/// Reads an HMAC key file: at least 16 bytes once trailing whitespace is
/// trimmed.
pub fn read_key(path: &Path) -> Result<hmac::Key, String> {
    let key = crate::secret::read_key(path, "HMAC key")?;
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &key))
}

/// Builds the line of a record (without the newline) and its hash.
fn encode(seq: u64, time: &str, event: &Event, prev: &str) -> (String, String) {
    let object = serde_json::to_string(event).unwrap_or_else(|_| "{\"event\":\"unencodable\"}".to_owned());
    // `{"event":...}` without its braces, spliced after seq and time.
    let inner = object
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or("\"event\":\"unencodable\"");
    let body = format!("{{\"seq\":{seq},\"time\":\"{time}\",{inner},\"prev\":\"{prev}\"");
    let hash = sha256_hex(body.as_bytes());
    let line = format!("{body},\"hash\":\"{hash}\"}}");
    (line, hash)
}

fn head_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}

enum Msg {
    Record(Event),
    Reopen,
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The handle that appends to the audit log. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    path: PathBuf,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

/// Where the writer appends: the log file (or, in tests, a file that
/// fails on demand).
trait Sink: std::io::Write + Send {
    fn sync(&mut self) -> std::io::Result<()>;
    /// Cuts the file back to `len` bytes (after a partial write).
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
    fn len(&self) -> std::io::Result<u64>;
}

impl Sink for std::fs::File {
    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }

    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)
    }

    fn len(&self) -> std::io::Result<u64> {
        self.metadata().map(|m| m.len())
    }
}

/// Records kept in memory while the file cannot be written; past this the
/// oldest are dropped and a gap marker is written when writing works
/// again.
const MAX_BACKLOG: usize = 65_536;

struct Writer {
    path: PathBuf,
    file: Box<dyn Sink>,
    /// The file's length after the last record written whole: a failed
    /// write is cut back to it, so no partial line stays in the chain.
    good_len: u64,
    seq: u64,
    prev: String,
    key: Option<hmac::Key>,
    checkpoint_every: u64,
    since_checkpoint: u64,
    /// Records not written yet (the file failed), oldest first, each with
    /// the time it happened.
    backlog: std::collections::VecDeque<(String, Event)>,
    /// The last failed write could not be cut back: nothing is written
    /// until it can be (a write after it would follow a partial line).
    needs_truncate: bool,
    /// The head file lags the log (its write failed): retried until it
    /// holds the last record, so an honest log verifies.
    head_dirty: bool,
    /// Records dropped from a full backlog since the last gap marker.
    lost: u64,
    /// [`MAX_BACKLOG`] (smaller in tests).
    max_backlog: usize,
}

impl AuditLog {
    /// Opens (or creates) the log, continuing the chain of what it holds,
    /// and starts its writer thread.
    pub fn open(config: &AuditLogConfig) -> Result<AuditLog, String> {
        let key = config.hmac_key_file.as_deref().map(read_key).transpose()?;
        let path = config.path.clone();
        let (file, seq, prev) = open_continuing(&path)?;
        let good_len = file
            .len()
            .map_err(|e| format!("{}: cannot read audit log: {e}", path.display()))?;
        let mut writer = Writer::new(
            path.clone(),
            Box::new(file),
            good_len,
            seq,
            prev,
            key,
            config.checkpoint_every,
        );
        let (tx, rx) = mpsc::channel::<Msg>();
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || {
                loop {
                    // With records waiting for a failed file, try again
                    // every second even when nothing new comes.
                    let msg = if writer.is_caught_up() {
                        rx.recv().ok()
                    } else {
                        match rx.recv_timeout(std::time::Duration::from_secs(1)) {
                            Ok(msg) => Some(msg),
                            Err(mpsc::RecvTimeoutError::Timeout) => {
                                writer.drain();
                                continue;
                            }
                            Err(mpsc::RecvTimeoutError::Disconnected) => None,
                        }
                    };
                    match msg {
                        Some(msg) => writer.handle(msg),
                        None => {
                            writer.finish();
                            return;
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the audit log writer: {e}"))?;
        Ok(AuditLog { tx, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a record; never blocks.
    pub fn record(&self, event: Event) {
        if self.tx.send(Msg::Record(event)).is_err() {
            tracing::error!("audit log writer is gone; an audit record was lost");
        }
    }

    /// Reopens the file at its path (after rotation); the chain continues.
    pub fn reopen(&self) {
        let _ = self.tx.send(Msg::Reopen);
    }

    /// Waits until every record queued before this call is on disk.
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

/// Opens the log for appending and finds where its chain stands: the last
/// record of the file, else the head file (a freshly rotated file), else a
/// new chain.
fn open_continuing(path: &Path) -> Result<(std::fs::File, u64, String), String> {
    let existing = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("{}: cannot read audit log: {e}", path.display())),
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: cannot open audit log: {e}", path.display()))?;
    if !existing.is_empty() && !existing.ends_with(b"\n") {
        // A crash cut the last record: keep it visible (verify reports
        // it) and start the next record on a line of its own.
        tracing::warn!(file = %path.display(), "audit log ends inside a record; continuing on a new line");
        file.write_all(b"\n")
            .map_err(|e| format!("{}: cannot write audit log: {e}", path.display()))?;
    }
    let last = existing
        .split(|b| *b == b'\n')
        .rev()
        .filter(|l| !l.is_empty())
        .find_map(|l| parse_tail(std::str::from_utf8(l).ok()?));
    if let Some((seq, hash)) = last {
        return Ok((file, seq, hash));
    }
    if let Ok(text) = std::fs::read_to_string(head_path(path)) {
        if let Some((seq, hash)) = parse_tail(&text) {
            return Ok((file, seq, hash));
        }
    }
    Ok((file, 0, ZERO_HASH.to_owned()))
}

/// `seq` and `hash` of a record line or of the head file.
fn parse_tail(text: &str) -> Option<(u64, String)> {
    let value: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    let seq = value.get("seq")?.as_u64()?;
    let hash = value.get("hash")?.as_str()?;
    (hash.len() == 64).then(|| (seq, hash.to_owned()))
}

impl Writer {
    fn new(
        path: PathBuf,
        file: Box<dyn Sink>,
        good_len: u64,
        seq: u64,
        prev: String,
        key: Option<hmac::Key>,
        checkpoint_every: u64,
    ) -> Writer {
        Writer {
            path,
            file,
            good_len,
            seq,
            prev,
            key,
            checkpoint_every,
            since_checkpoint: 0,
            backlog: std::collections::VecDeque::new(),
            needs_truncate: false,
            head_dirty: false,
            lost: 0,
            max_backlog: MAX_BACKLOG,
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Record(event) => self.append(event),
            Msg::Reopen => self.reopen(),
            Msg::Flush(done) => {
                self.drain();
                let _ = done.send(());
            }
        }
    }

    /// Nothing waits to be written.
    fn is_caught_up(&self) -> bool {
        self.backlog.is_empty() && !self.head_dirty && !self.needs_truncate
    }

    /// Queues a record (stamped now) behind any that are waiting, then
    /// writes what it can, in order.
    fn append(&mut self, event: Event) {
        if self.backlog.len() >= self.max_backlog {
            self.backlog.pop_front();
            self.lost += 1;
        }
        self.backlog
            .push_back((super::clock::rfc3339_ms(SystemTime::now()), event));
        self.drain();
    }

    /// Writes waiting records until one fails (it stays first in line),
    /// and brings the head file up to date.
    fn drain(&mut self) {
        if self.lost > 0 {
            let gap = Event::RecordsLost {
                count: self.lost,
                reason: "the audit log could not be written and its backlog was full".into(),
            };
            let now = super::clock::rfc3339_ms(SystemTime::now());
            if !self.write_one(&now, &gap) {
                return;
            }
            tracing::error!(file = %self.path.display(), count = self.lost, "audit records were lost while the log could not be written; a gap marker records it");
            self.lost = 0;
        }
        while let Some((time, event)) = self.backlog.front().cloned() {
            if !self.write_one(&time, &event) {
                return;
            }
            self.backlog.pop_front();
        }
        if self.head_dirty {
            self.head_dirty = !self.write_head();
        }
    }

    /// The writer is stopping (the proxy is exiting): a last try, and an
    /// error naming what could not be written.
    fn finish(&mut self) {
        self.drain();
        if !self.backlog.is_empty() {
            tracing::error!(file = %self.path.display(), records = self.backlog.len(), "the audit log could not be written before exit; records lost");
        }
    }

    /// One record, then a checkpoint when one is due; false when the file
    /// failed (nothing of the record stays in it).
    fn write_one(&mut self, time: &str, event: &Event) -> bool {
        if !self.write_record(time, event) {
            return false;
        }
        if let Some(key) = &self.key {
            self.since_checkpoint += 1;
            if self.since_checkpoint >= self.checkpoint_every {
                let mac = mac_hex(key, &format!("{}:{}", self.seq + 1, self.prev));
                // A checkpoint that fails is tried again with the next
                // record (it is due still).
                let now = super::clock::rfc3339_ms(SystemTime::now());
                if self.write_record(&now, &Event::Checkpoint { mac }) {
                    self.since_checkpoint = 0;
                }
            }
        }
        true
    }

    /// Appends one record and syncs it. On failure (a full disk) the file
    /// is cut back to its last whole record and the chain does not move,
    /// so the record can be written again later with the same `seq`.
    fn write_record(&mut self, time: &str, event: &Event) -> bool {
        if self.needs_truncate {
            if self.file.truncate(self.good_len).is_err() {
                return false;
            }
            self.needs_truncate = false;
        }
        let seq = self.seq + 1;
        let (mut line, hash) = encode(seq, time, event, &self.prev);
        line.push('\n');
        let result = self.file.write_all(line.as_bytes()).and_then(|()| self.file.sync());
        if let Err(e) = result {
            self.needs_truncate = self.file.truncate(self.good_len).is_err();
            if self.backlog.len() <= 1 {
                // Said once per outage, not once per record.
                tracing::error!(file = %self.path.display(), error = %e, truncated = !self.needs_truncate, "cannot write the audit log; keeping records in memory until it can be written");
            }
            return false;
        }
        self.good_len += line.len() as u64;
        self.seq = seq;
        self.prev = hash;
        self.head_dirty = !self.write_head();
        true
    }

    /// Replaces `<file>.head` atomically (write a temporary file, rename);
    /// false when that failed.
    fn write_head(&self) -> bool {
        let mut head = format!("{{\"seq\":{},\"hash\":\"{}\"", self.seq, self.prev);
        if let Some(key) = &self.key {
            let mac = mac_hex(key, &format!("head:{}:{}", self.seq, self.prev));
            head.push_str(&format!(",\"mac\":\"{mac}\""));
        }
        head.push_str("}\n");
        let target = head_path(&self.path);
        let mut tmp = target.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        if let Err(e) = std::fs::write(&tmp, head).and_then(|()| std::fs::rename(&tmp, &target)) {
            if !self.head_dirty {
                tracing::error!(file = %target.display(), error = %e, "cannot write the audit head file; retrying every second");
            }
            return false;
        }
        true
    }

    fn reopen(&mut self) {
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|file| Ok((Sink::len(&file)?, file)));
        match opened {
            Ok((len, file)) => {
                self.file = Box::new(file);
                self.good_len = len;
                self.drain();
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "cannot reopen the audit log; still writing the old file")
            }
        }
    }
}

#[cfg(test)]
mod tests;
