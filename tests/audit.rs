//! The audit log: records from a real proxy, the chain across restarts and
//! rotation, and `portcullis audit verify` naming the line of each kind of
//! tampering.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use portcullis::observe::Event;
use serde_json::Value;
use support::*;

fn config(origin: std::net::SocketAddr, audit: &Path, extra: &str) -> String {
    Template::new(&[origin])
        .route("name = \"main\"")
        .extra(&format!(
            "[audit_log]\npath = {:?}\n{extra}",
            audit.display().to_string()
        ))
        .build()
}

/// Starts and stops a proxy: three records (start, config, stop).
async fn run_once(toml: &str) {
    let proxy = start_proxy(toml).await;
    proxy.shutdown().await;
}

fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON record"))
        .collect()
}

/// `portcullis audit verify ARGS...`: (exit code, stdout + stderr).
fn verify(args: &[&Path]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("audit")
        .arg("verify")
        .args(args)
        .output()
        .expect("run portcullis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A chain of nine records made by three runs of the proxy.
async fn nine_records(dir: &Path) -> PathBuf {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let path = dir.join("audit.jsonl");
    let toml = config(origin.addr, &path, "");
    for _ in 0..3 {
        run_once(&toml).await;
    }
    path
}

#[tokio::test]
async fn the_chain_continues_across_restarts_and_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = nine_records(dir.path()).await;
    let records = events(&path);
    let names: Vec<&str> = records.iter().map(|r| r["event"].as_str().unwrap_or("")).collect();
    assert_eq!(
        names,
        ["process.start", "config.load", "process.stop"].repeat(3),
        "three runs"
    );
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
        let prev = if i == 0 {
            "0".repeat(64)
        } else {
            records[i - 1]["hash"].as_str().expect("hash").to_owned()
        };
        assert_eq!(r["prev"], prev.as_str(), "record {} chains to the one before", i + 1);
    }
    assert_eq!(records[1]["routes"], serde_json::json!(["main"]));
    assert_eq!(records[1]["upstreams"], serde_json::json!(["app"]));
    assert_eq!(records[1]["trigger"], "start");

    let (code, out) = verify(&[&path]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        "intact: 9 record(s), seq 1..=9, end confirmed by the head file"
    );
}

/// Rewrites the log with `edit` applied to its lines, in a fresh directory
/// with the head file beside it, and returns the verify output.
fn tampered(original: &Path, edit: impl FnOnce(&mut Vec<String>)) -> (i32, String) {
    tampered_file(original, edit, true)
}

fn tampered_file(original: &Path, edit: impl FnOnce(&mut Vec<String>), final_newline: bool) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("audit.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(original)
        .expect("read")
        .lines()
        .map(str::to_owned)
        .collect();
    edit(&mut lines);
    let mut text = lines.join("\n");
    if final_newline {
        text.push('\n');
    }
    std::fs::write(&copy, text).expect("write");
    let mut head = original.as_os_str().to_owned();
    head.push(".head");
    std::fs::copy(PathBuf::from(head), dir.path().join("audit.jsonl.head")).expect("copy head");
    let (code, out) = verify(&[&copy]);
    (code, out.replace(&copy.display().to_string(), "audit.jsonl"))
}

#[tokio::test]
async fn verify_names_the_line_of_each_kind_of_tampering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = nine_records(dir.path()).await;

    // One byte changed in record 5 (a config.load).
    let (code, out) = tampered(&path, |lines| {
        let flipped = lines[4].replacen("\"trigger\":\"start\"", "\"trigger\":\"stars\"", 1);
        assert_ne!(flipped, lines[4]);
        lines[4] = flipped;
    });
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        "TAMPERED: audit.jsonl:5: record modified: its content does not match its hash"
    );

    let (code, out) = tampered(&path, |lines| {
        lines.remove(4);
    });
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        "TAMPERED: audit.jsonl:5: 1 record(s) deleted before this line: expected seq 5, found 6"
    );

    let (code, out) = tampered(&path, |lines| lines.swap(3, 4));
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        "TAMPERED: audit.jsonl:4: records reordered: seq 5 is here but seq 4 comes later (audit.jsonl:5)"
    );

    let (code, out) = tampered(&path, |lines| {
        let copy = lines[2].clone();
        lines.insert(3, copy);
    });
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        "TAMPERED: audit.jsonl:4: inserted record: seq 3 repeats the line before"
    );

    // The file cut in the middle of its last record.
    let (code, out) = tampered_file(
        &path,
        |lines| {
            let last = lines.last_mut().expect("lines");
            last.truncate(last.len() / 2);
        },
        false,
    );
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        "TAMPERED: audit.jsonl:9: truncated record: the file ends inside it"
    );

    // Whole records cut off the end: only the head file can tell.
    let (code, out) = tampered(&path, |lines| lines.truncate(7));
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        "TAMPERED: audit.jsonl:8: tail truncated: records 8..=9 are missing (the head file records seq 9)"
    );

    // A record rewritten with a correct hash of its own still breaks the
    // next record's link.
    let (code, out) = tampered(&path, |lines| {
        let text = lines[5].replace("\"reason\":\"shutdown\"", "\"reason\":\"forged\"");
        assert_ne!(text, lines[5], "record 6 is a process.stop");
        let body = &text[..text.rfind(",\"hash\":\"").expect("hash")];
        let hash = portcullis::observe::audit::sha256_hex(body.as_bytes());
        lines[5] = format!("{body},\"hash\":\"{hash}\"}}");
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        out.trim()
            .starts_with("TAMPERED: audit.jsonl:7: chain broken: prev does not match the hash of the record before it"),
        "{out}"
    );
}

#[tokio::test]
async fn rotation_starts_the_new_file_from_the_old_files_last_hash() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let proxy = start_proxy(&config(origin.addr, &path, "")).await;
    let event = |server: &str| Event::ServerEjected {
        upstream: "app".into(),
        server: server.into(),
        reason: "test".into(),
    };
    proxy.observe.audit(event("a"));
    proxy.observe.flush().await;
    let rotated = dir.path().join("audit.jsonl.1");
    std::fs::rename(&path, &rotated).expect("rotate");
    proxy.observe.reopen();
    proxy.observe.audit(event("b"));
    proxy.shutdown().await;

    let old = events(&rotated);
    let new = events(&path);
    assert_eq!(old.len(), 3, "start, config, ejection");
    assert_eq!(new[0]["seq"], 4);
    assert_eq!(new[0]["prev"], old[2]["hash"], "the new file continues the chain");
    let (code, out) = verify(&[&rotated, &path]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("intact: 5 record(s), seq 1..=5"), "{out}");
    // A file that is missing from the middle is noticed.
    let (code, out) = verify(&[&path]);
    assert_eq!(code, 0, "a rotated file alone verifies from where it starts: {out}");
    assert!(out.starts_with("intact: 2 record(s), seq 4..=5"), "{out}");
}

#[tokio::test]
async fn signed_checkpoints_need_the_key() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let key = dir.path().join("audit.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").expect("key");
    let extra = format!(
        "hmac_key_file = {:?}\ncheckpoint_every = 2\n",
        key.display().to_string()
    );
    run_once(&config(origin.addr, &path, &extra)).await;
    let names: Vec<String> = events(&path)
        .iter()
        .map(|r| r["event"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(names, ["process.start", "config.load", "checkpoint", "process.stop"]);

    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["audit", "verify", "--key-file"])
        .arg(&key)
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 signed checkpoint(s) verified"),
        "{out:?}"
    );
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, "fedcba9876543210fedcba9876543210").expect("key");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["audit", "verify", "--key-file"])
        .arg(&wrong)
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(":3: checkpoint signature does not verify"), "{text}");
}

#[tokio::test]
async fn verify_reports_unreadable_files_with_exit_2() {
    let (code, out) = verify(&[Path::new("/nonexistent/audit.jsonl")]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot verify: /nonexistent/audit.jsonl"), "{out}");
}

#[tokio::test]
async fn an_ejected_server_is_audited() {
    let live = origin(|_| async { text(200, "ok") }).await;
    let closed = closed_port();
    let dead = closed.addr;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let toml = format!(
        r#"
[[listeners]]
bind = "127.0.0.1:0"
[[routes]]
upstream = "app"
[upstreams.app]
servers = ["{dead}", "{}"]
algorithm = "round_robin"
[upstreams.app.outlier]
consecutive_failures = 1
[audit_log]
path = {:?}
"#,
        live.addr,
        path.display().to_string()
    );
    let proxy = start_proxy(&toml).await;
    for _ in 0..2 {
        assert_eq!(get(proxy.addr, "/").await.status, 200, "retried on the live server");
    }
    proxy.shutdown().await;
    let ejected: Vec<Value> = events(&path)
        .into_iter()
        .filter(|r| r["event"] == "upstream.server_ejected")
        .collect();
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    assert_eq!(ejected[0]["server"], dead.to_string());
    assert_eq!(ejected[0]["upstream"], "app");
    assert_eq!(verify(&[&path]).0, 0);
}
