//! `portcullis audit verify`: reads audit log files (oldest first) and
//! names the first modified, deleted, inserted, reordered or truncated
//! record by its line, checking signed checkpoints and the head file.

use super::*;

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

/// The chain fields of one record line.
pub(super) struct Parsed {
    pub(super) seq: u64,
    pub(super) prev: String,
    pub(super) hash: String,
    pub(super) event: String,
    pub(super) mac: Option<String>,
}

pub(super) fn parse_line(text: &str) -> Result<Parsed, String> {
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
