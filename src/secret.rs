//! Small helpers for keys and digests shared by the config, the audit log,
//! TLS and the challenge cookie: reading a key file, lower-case hex, and
//! the SHA-256 of bytes as lower-case hex (the one `sha256_hex`).

use std::path::Path;

/// Reads a key file (`what` names it in errors): its bytes without
/// trailing whitespace, at least 16 of them.
pub fn read_key(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: cannot read {what}: {e}", path.display()))?;
    let key = bytes.trim_ascii_end();
    if key.len() < 16 {
        return Err(format!(
            "{}: {what} too short ({} bytes; at least 16)",
            path.display(),
            key.len()
        ));
    }
    Ok(key.to_vec())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
    out
}

/// SHA-256 of `bytes`, as 64 lower-case hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_trimmed_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "0123456789abcdef\n").expect("write");
        assert_eq!(read_key(&ok, "test key").expect("key"), b"0123456789abcdef");
        let short = dir.path().join("short");
        std::fs::write(&short, "short\n").expect("write");
        assert!(
            read_key(&short, "test key")
                .unwrap_err()
                .ends_with("test key too short (5 bytes; at least 16)")
        );
        assert!(
            read_key(&dir.path().join("missing"), "test key")
                .unwrap_err()
                .contains("cannot read test key")
        );
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
