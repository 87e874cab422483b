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

/// A verified chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intact {
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub checkpoints_verified: u64,
    /// Checkpoints present but not checked (no key given).
    pub checkpoints_unchecked: u64,
    /// Whether a head file confirmed that nothing was cut off the end.
    pub head_checked: bool,
}

/// The first place where a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {what}", file.display())]
pub struct Tampered {
    pub file: PathBuf,
    pub line: usize,
    pub what: String,
}

struct Line<'a> {
    file: usize,
    number: usize,
    text: &'a str,
    /// The file ends inside this line.
    partial: bool,
}

struct Parsed {
    seq: u64,
    prev: String,
    hash: String,
    event: String,
    mac: Option<String>,
}

fn parse_line(text: &str) -> Result<Parsed, String> {
    const MARK: &str = ",\"hash\":\"";
    let at = text.rfind(MARK).ok_or("record modified: it has no hash field")?;
    let (body, rest) = text.split_at(at);
    let stored = rest[MARK.len()..]
        .strip_suffix("\"}")
        .ok_or("record modified: it does not end with its hash")?;
    if sha256_hex(body.as_bytes()) != stored {
        return Err("record modified: its content does not match its hash".to_owned());
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|_| "record modified: not valid JSON".to_owned())?;
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    Ok(Parsed {
        seq: value
            .get("seq")
            .and_then(|v| v.as_u64())
            .ok_or("record modified: no sequence number")?,
        prev: field("prev").ok_or("record modified: no prev field")?,
        hash: stored.to_owned(),
        event: field("event").unwrap_or_default(),
        mac: field("mac"),
    })
}

/// Checks the chain across `files` (in order: oldest first). `key` checks
/// the signed checkpoints; `head` is the head file to check the end
/// against (`None`: the `.head` beside the last file, if there is one).
#[allow(
    clippy::too_many_lines,
    reason = "one pass over the lines that names each kind of break where it is found; split, the cases lose their order"
)]
pub fn verify(files: &[PathBuf], key: Option<&hmac::Key>, head: Option<&Path>) -> Result<Intact, VerifyError> {
    let mut contents = Vec::with_capacity(files.len());
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| VerifyError::Io(format!("{}: {e}", f.display())))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let offset = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..offset].iter().filter(|b| **b == b'\n').count() + 1;
            VerifyError::Tampered(Tampered {
                file: f.clone(),
                line,
                what: "record modified: not valid UTF-8".into(),
            })
        })?;
        contents.push(text);
    }
    let mut lines = Vec::new();
    for (i, text) in contents.iter().enumerate() {
        let pieces: Vec<&str> = text.split('\n').collect();
        let count = pieces.len();
        for (n, piece) in pieces.into_iter().enumerate() {
            let last = n + 1 == count;
            if last && piece.is_empty() {
                continue;
            }
            lines.push(Line {
                file: i,
                number: n + 1,
                text: piece,
                partial: last,
            });
        }
    }
    let fail = |line: &Line<'_>, what: String| {
        VerifyError::Tampered(Tampered {
            file: files[line.file].clone(),
            line: line.number,
            what,
        })
    };
    let seq_of = |line: &Line<'_>| parse_line(line.text).ok().map(|p| p.seq);

    let mut intact = Intact {
        records: 0,
        first_seq: 0,
        last_seq: 0,
        checkpoints_verified: 0,
        checkpoints_unchecked: 0,
        head_checked: false,
    };
    let mut prev_hash: Option<String> = None;
    let mut prev_prev_hash: Option<String> = None;
    for (k, line) in lines.iter().enumerate() {
        if line.partial {
            return Err(fail(line, "truncated record: the file ends inside it".into()));
        }
        let record = parse_line(line.text).map_err(|why| fail(line, why))?;
        match &prev_hash {
            None => {
                if record.seq == 1 && record.prev != ZERO_HASH {
                    return Err(fail(
                        line,
                        "record modified: the first record must have an all-zero prev".into(),
                    ));
                }
                intact.first_seq = record.seq;
            }
            Some(prev) => {
                let expected = intact.last_seq + 1;
                let before = &lines[k - 1];
                if record.seq == expected {
                    if &record.prev != prev {
                        return Err(fail(
                            line,
                            format!(
                                "chain broken: prev does not match the hash of the record before it ({}:{}); a record was rewritten",
                                files[before.file].display(),
                                before.number
                            ),
                        ));
                    }
                } else if record.seq > expected {
                    let later = lines[k + 1..].iter().find(|l| seq_of(l) == Some(expected));
                    return Err(fail(
                        line,
                        match later {
                            Some(l) => format!(
                                "records reordered: seq {} is here but seq {expected} comes later ({}:{})",
                                record.seq,
                                files[l.file].display(),
                                l.number
                            ),
                            None => format!(
                                "{} record(s) deleted before this line: expected seq {expected}, found {}",
                                record.seq - expected,
                                record.seq
                            ),
                        },
                    ));
                } else if record.seq + 1 == expected {
                    // The same seq twice: one of the two was inserted. The
                    // genuine one chains to the record before both.
                    if record.hash != *prev && Some(&record.prev) == prev_prev_hash.as_ref() {
                        return Err(fail(
                            before,
                            format!("inserted record: seq {} appears again on the next line", record.seq),
                        ));
                    }
                    return Err(fail(
                        line,
                        format!("inserted record: seq {} repeats the line before", record.seq),
                    ));
                } else {
                    return Err(fail(
                        line,
                        format!(
                            "records reordered: seq {} comes after seq {}",
                            record.seq, intact.last_seq
                        ),
                    ));
                }
            }
        }
        if record.event == "checkpoint" {
            match key {
                Some(key) => {
                    let expected = mac_hex(key, &format!("{}:{}", record.seq, record.prev));
                    if record.mac.as_deref() != Some(expected.as_str()) {
                        return Err(fail(line, "checkpoint signature does not verify with this key".into()));
                    }
                    intact.checkpoints_verified += 1;
                }
                None => intact.checkpoints_unchecked += 1,
            }
        }
        intact.records += 1;
        intact.last_seq = record.seq;
        prev_prev_hash = prev_hash.replace(record.hash);
    }

    // The end: what the head file says was written last.
    let head_file = match head {
        Some(p) => Some(p.to_owned()),
        None => files.last().map(|f| head_path(f)).filter(|p| p.exists()),
    };
    if let Some(head_file) = head_file {
        let text = std::fs::read_to_string(&head_file)
            .map_err(|e| VerifyError::Io(format!("{}: {e}", head_file.display())))?;
        let (seq, hash) =
            parse_tail(&text).ok_or_else(|| VerifyError::Io(format!("{}: not a head file", head_file.display())))?;
        if let Some(key) = key {
            let value: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
            let mac = value.get("mac").and_then(|v| v.as_str());
            if mac != Some(mac_hex(key, &format!("head:{seq}:{hash}")).as_str()) {
                return Err(VerifyError::Tampered(Tampered {
                    file: head_file.clone(),
                    line: 1,
                    what: "head file signature does not verify with this key".into(),
                }));
            }
        }
        let last_file = files.len().saturating_sub(1);
        let end_line = lines.iter().rev().find(|l| l.file == last_file).map_or(0, |l| l.number);
        let at_end = |what: String| {
            VerifyError::Tampered(Tampered {
                file: files.last().cloned().unwrap_or_default(),
                line: end_line + 1,
                what,
            })
        };
        if seq > intact.last_seq {
            return Err(at_end(format!(
                "tail truncated: records {}..={seq} are missing (the head file records seq {seq})",
                intact.last_seq + 1
            )));
        }
        if seq < intact.last_seq || prev_hash.as_deref() != Some(hash.as_str()) {
            return Err(at_end(format!(
                "the last record does not match the head file (seq {seq}, hash {hash})"
            )));
        }
        intact.head_checked = true;
    }
    Ok(intact)
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Tampered(Tampered),
    #[error("cannot verify: {0}")]
    Io(String),
}

#[cfg(test)]
mod tests {
    /// A file on a disk that fills up: writes past `room` bytes write
    /// what fits, then fail with "no space left".
    struct FullDisk {
        file: std::fs::File,
        room: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }

    impl std::io::Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            use std::sync::atomic::Ordering;
            let room = self.room.load(Ordering::SeqCst);
            if room == 0 {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            let n = buf.len().min(room as usize);
            let written = self.file.write(&buf[..n])?;
            self.room.fetch_sub(written as u64, Ordering::SeqCst);
            Ok(written)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink for FullDisk {
        fn sync(&mut self) -> std::io::Result<()> {
            Ok(())
        }

        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            self.file.set_len(len)
        }

        fn len(&self) -> std::io::Result<u64> {
            Sink::len(&self.file)
        }
    }

    fn full_disk_writer(path: &Path, room: &std::sync::Arc<std::sync::atomic::AtomicU64>) -> Writer {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open");
        let sink = FullDisk {
            file,
            room: room.clone(),
        };
        Writer::new(path.to_owned(), Box::new(sink), 0, 0, ZERO_HASH.to_owned(), None, 100)
    }

    fn stop(i: u32) -> Event {
        Event::ProcessStop {
            pid: i,
            reason: "test".into(),
        }
    }

    /// Regression (issue 13): a failed write left a partial line and the
    /// next record repeated its sequence number, so an honest log later
    /// verified as tampered.
    #[test]
    fn the_audit_log_recovers_from_a_full_disk() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.jsonl");
        let room = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let mut writer = full_disk_writer(&path, &room);
        for i in 0..3 {
            writer.append(stop(i));
        }
        // The disk fills in the middle of the next record.
        room.store(40, Ordering::SeqCst);
        writer.append(stop(3));
        writer.append(stop(4));
        assert_eq!(writer.backlog.len(), 2, "kept in memory, in order");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with('\n'), "no partial line stays in the file");
        assert_eq!(text.lines().count(), 3);
        // Room again: the waiting records go out first, then the new one.
        room.store(u64::MAX, Ordering::SeqCst);
        writer.append(stop(5));
        assert!(writer.backlog.is_empty());
        let intact = verify(std::slice::from_ref(&path), None, None).expect("the chain verifies");
        assert_eq!((intact.records, intact.last_seq), (6, 6));
        let pids: Vec<u64> = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("pid")?.as_u64())
            .collect();
        assert_eq!(pids, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_head_file_that_cannot_be_written_is_retried() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.jsonl");
        let room = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let mut writer = full_disk_writer(&path, &room);
        writer.append(stop(0));
        // The head's rename target is a directory now: its write fails.
        let head = head_path(&path);
        std::fs::remove_file(&head).expect("head written once");
        std::fs::create_dir(&head).expect("block the head");
        writer.append(stop(1));
        assert!(writer.head_dirty && !writer.is_caught_up());
        std::fs::remove_dir(&head).expect("unblock");
        writer.drain();
        assert!(writer.is_caught_up());
        let intact = verify(std::slice::from_ref(&path), None, Some(&head)).expect("log and head agree");
        assert_eq!(intact.last_seq, 2);
    }

    #[test]
    fn a_backlog_that_overflows_leaves_a_gap_marker_not_a_broken_chain() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.jsonl");
        let room = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut writer = full_disk_writer(&path, &room);
        writer.max_backlog = 100;
        for i in 0..110 {
            writer.append(stop(i));
        }
        assert_eq!(writer.backlog.len(), 100);
        room.store(u64::MAX, Ordering::SeqCst);
        writer.drain();
        let intact = verify(std::slice::from_ref(&path), None, None).expect("the chain verifies");
        assert_eq!(intact.records, 101);
        let first = std::fs::read_to_string(&path).expect("read");
        let first: serde_json::Value = serde_json::from_str(first.lines().next().expect("a line")).expect("json");
        assert_eq!(first["event"], "audit.records_lost");
        assert_eq!(first["count"], 10);
    }
    use super::*;

    fn write_chain(dir: &Path, n: u64, key: Option<&hmac::Key>) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let mut prev = ZERO_HASH.to_owned();
        let mut out = String::new();
        let mut seq = 0;
        for i in 0..n {
            seq += 1;
            let event = Event::ProcessStop {
                pid: i as u32,
                reason: format!("r{i}"),
            };
            let (line, hash) = encode(seq, "2026-11-28T00:00:00.000Z", &event, &prev);
            out.push_str(&line);
            out.push('\n');
            prev = hash;
            if let Some(key) = key {
                seq += 1;
                let mac = mac_hex(key, &format!("{seq}:{prev}"));
                let (line, hash) = encode(seq, "2026-11-28T00:00:00.000Z", &Event::Checkpoint { mac }, &prev);
                out.push_str(&line);
                out.push('\n');
                prev = hash;
            }
        }
        std::fs::write(&path, out).expect("write");
        path
    }

    #[test]
    fn hash_covers_everything_before_the_hash_field() {
        let (line, hash) = encode(1, "t", &Event::ProcessStart { pid: 7, version: "1" }, ZERO_HASH);
        assert!(line.starts_with("{\"seq\":1,\"time\":\"t\",\"event\":\"process.start\",\"pid\":7,"));
        let body = &line[..line.rfind(",\"hash\"").expect("hash")];
        assert_eq!(sha256_hex(body.as_bytes()), hash);
        let parsed = parse_line(&line).expect("parses");
        assert_eq!(parsed.seq, 1);
        assert_eq!(parsed.prev, ZERO_HASH);
    }

    #[test]
    fn intact_chain_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_chain(dir.path(), 5, None);
        let intact = verify(&[path], None, None).expect("intact");
        assert_eq!((intact.records, intact.first_seq, intact.last_seq), (5, 1, 5));
    }

    #[test]
    fn signed_checkpoints_verify_only_with_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"0123456789abcdef");
        let other = hmac::Key::new(hmac::HMAC_SHA256, b"fedcba9876543210");
        let path = write_chain(dir.path(), 3, Some(&key));
        let ok = verify(std::slice::from_ref(&path), Some(&key), None).expect("intact");
        assert_eq!(ok.checkpoints_verified, 3);
        let unchecked = verify(std::slice::from_ref(&path), None, None).expect("intact");
        assert_eq!(unchecked.checkpoints_unchecked, 3);
        let Err(VerifyError::Tampered(t)) = verify(&[path], Some(&other), None) else {
            panic!("wrong key must fail")
        };
        assert_eq!(t.line, 2);
    }

    #[test]
    fn read_key_refuses_short_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let short = dir.path().join("k");
        std::fs::write(&short, "short\n").expect("write");
        assert!(read_key(&short).unwrap_err().contains("too short"));
        assert!(
            read_key(&dir.path().join("missing"))
                .unwrap_err()
                .contains("cannot read")
        );
    }
}
