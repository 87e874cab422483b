//! Tests of the audit log: chains across restarts, every kind of
//! tampering named by line, signed checkpoints, and a full disk.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

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
