//! TLS session tickets sealed with keys from a file, so several fluxgate instances that share
//! the file resume each other's sessions. One key per line, 64 hex digits (32 bytes); the
//! first line's key seals new tickets, every line's key opens them, so keys are rotated by
//! adding a line at the top, reloading, and later dropping the oldest.
//!
//! Ticket layout: key id (4 bytes, from SHA-256 of the key) | nonce (12) | AES-256-GCM
//! ciphertext and tag, with the key id as associated data.

use std::path::Path;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// How long clients may keep a ticket, in seconds (a hint; keys are what expire tickets).
const LIFETIME_SECS: u32 = 12 * 3600;

struct TicketKey {
    id: [u8; 4],
    key: LessSafeKey,
}

/// `ProducesTickets` over the keys of one file.
pub(crate) struct FileTicketer {
    keys: Vec<TicketKey>,
    rng: SystemRandom,
}

impl std::fmt::Debug for FileTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileTicketer")
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn unhex(line: &str) -> Option<[u8; 32]> {
    let b = line.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

impl FileTicketer {
    /// Reads the key file; the error names it and the offending line.
    pub(crate) fn load(path: &Path) -> Result<FileTicketer, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let raw = unhex(line).ok_or_else(|| {
                format!(
                    "{} line {}: a ticket key is 64 hex digits",
                    path.display(),
                    n + 1
                )
            })?;
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &raw);
            let mut id = [0u8; 4];
            id.copy_from_slice(&digest.as_ref()[..4]);
            let unbound =
                UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| "bad ticket key".to_owned())?;
            keys.push(TicketKey {
                id,
                key: LessSafeKey::new(unbound),
            });
        }
        if keys.is_empty() {
            return Err(format!("{}: no ticket key in the file", path.display()));
        }
        Ok(FileTicketer {
            keys,
            rng: SystemRandom::new(),
        })
    }
}

impl rustls::server::ProducesTickets for FileTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let k = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(4 + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&k.id);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        k.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(k.id),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < 4 + NONCE_LEN + 16 {
            return None;
        }
        let (id, rest) = cipher.split_at(4);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let k = self.keys.iter().find(|k| k.id == id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain = k
            .key
            .open_in_place(nonce, Aad::from(k.id), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    fn file(lines: &[&str]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!(
            "fluxgate-keys-{}-{}",
            std::process::id(),
            lines.len()
        ));
        std::fs::write(&p, lines.join("\n")).unwrap();
        p
    }

    #[test]
    fn seal_open_rotate_and_refuse() {
        let (a, b) = ("11".repeat(32), "22".repeat(32));
        let old = FileTicketer::load(&file(&[&a])).unwrap();
        let ticket = old.encrypt(b"session state").unwrap();
        assert_eq!(old.decrypt(&ticket).unwrap(), b"session state");
        // Rotated: a new first key seals, the old one still opens old tickets.
        let new = FileTicketer::load(&file(&["# rotated", &b, &a])).unwrap();
        assert_eq!(new.decrypt(&ticket).unwrap(), b"session state");
        let fresh = new.encrypt(b"x").unwrap();
        assert!(old.decrypt(&fresh).is_none(), "unknown key id");
        let mut bad = ticket.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(new.decrypt(&bad).is_none(), "tampered");
        assert!(new.decrypt(&ticket[..10]).is_none(), "short");
        let err = FileTicketer::load(&file(&["xyz"])).unwrap_err();
        assert!(err.contains("line 1"), "{err}");
    }
}
