//! Cluster authentication: one shared secret, proven in every handshake.
//!
//! Every process of a cluster (Conductor, Supervisors, workers, the CLI and
//! remote clients) reads the same secret from the file named by
//! `cluster.secret.file` in `rama.yaml`. Both ends of every connection
//! prove they hold it with HMAC-SHA256 over fresh nonces from both sides
//! (see [`crate::transport`] for the bytes); the secret itself never
//! crosses the wire, a recorded handshake cannot be replayed (the other
//! side's nonce is new each time), and a server proves itself before the
//! client sends anything, so a rewritten registration cannot lead clients
//! to an impostor.
//!
//! Secret file: 64 hexadecimal digits (32 random bytes) and a newline,
//! mode 0600. A file that others can read is refused.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the secret.
pub const SECRET_BYTES: usize = 32;
/// Bytes of each side's handshake nonce.
pub const NONCE_BYTES: usize = 16;
/// Bytes of a proof (an HMAC-SHA256 tag).
pub const PROOF_BYTES: usize = 32;

/// What a proof is for: a server's and a client's proofs are never
/// interchangeable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// Why a secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "the cluster secret file {path} does not exist; create it once with `rama secret create` and copy it \
         to every node (mode 0600), or point cluster.secret.file in rama.yaml at it"
    )]
    Missing { path: PathBuf },
    #[error("cannot {what} the cluster secret file {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the cluster secret file {path} can be read by other users (mode {mode:o}); make it private with \
         `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the cluster secret file {path} is not {SECRET_BYTES} bytes in hexadecimal; {why}")]
    Malformed { path: PathBuf, why: &'static str },
    #[error(
        "the cluster secret file {path} already exists; pass --force to replace it (every node needs the new one)"
    )]
    Exists { path: PathBuf },
}

/// The cluster secret. Cheap to clone; its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct Secret(Arc<[u8; SECRET_BYTES]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret of these bytes (tests, and processes handed one).
    pub fn from_bytes(bytes: [u8; SECRET_BYTES]) -> Secret {
        Secret(Arc::new(bytes))
    }

    /// A new random secret.
    pub fn generate() -> Secret {
        let mut b = [0u8; SECRET_BYTES];
        random(&mut b);
        Secret::from_bytes(b)
    }

    /// Reads the secret file at `path`, refusing one other users can read.
    pub fn load(path: &Path) -> Result<Secret, SecretError> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SecretError::Missing { path: path.into() })
            }
            Err(source) => {
                return Err(SecretError::Io {
                    what: "read",
                    path: path.into(),
                    source,
                })
            }
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretError::Exposed {
                path: path.into(),
                mode,
            });
        }
        // Bounded: a secret file is 65 bytes; anything far larger is not one.
        if meta.len() > 1024 {
            return Err(SecretError::Malformed {
                path: path.into(),
                why: "the file is far too long",
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Io {
            what: "read",
            path: path.into(),
            source,
        })?;
        Secret::parse(text.trim()).map_err(|why| SecretError::Malformed { path: path.into(), why })
    }

    fn parse(hex: &str) -> Result<Secret, &'static str> {
        if hex.len() != SECRET_BYTES * 2 {
            return Err("expected 64 hexadecimal digits");
        }
        let mut b = [0u8; SECRET_BYTES];
        for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
            let digit = |c: u8| {
                (c as char)
                    .to_digit(16)
                    .ok_or("found a character that is not a hexadecimal digit")
            };
            b[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Ok(Secret::from_bytes(b))
    }

    /// Writes a new random secret to `path` (mode 0600, its directory
    /// created), refusing to replace an existing file unless `replace`.
    pub fn create(path: &Path, replace: bool) -> Result<Secret, SecretError> {
        if path.exists() && !replace {
            return Err(SecretError::Exists { path: path.into() });
        }
        let io = |what| {
            let path = path.to_path_buf();
            move |source| SecretError::Io { what, path, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
        }
        let secret = Secret::generate();
        // Written beside the target and renamed over it, so a crash leaves
        // the old secret or the new one, never half of one.
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create"))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io("set the mode of"))?;
        let hex: String = secret.0.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(f, "{hex}").map_err(io("write"))?;
        f.sync_all().map_err(io("sync"))?;
        std::fs::rename(&tmp, path).map_err(io("rename into place"))?;
        Ok(secret)
    }

    /// A credential derived from the secret for one purpose (`label`), in
    /// hexadecimal: the metastore password, say. It reveals nothing of the
    /// secret or of credentials for other labels.
    pub fn derive(&self, label: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0[..]).expect("HMAC takes a key of any length");
        mac.update(b"rama-derive-v1:");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The proof that `side` holds the secret, bound to both nonces (the
    /// prover's peer's first) and the connection's role.
    pub fn proof(
        &self,
        side: Side,
        peer_nonce: &[u8; NONCE_BYTES],
        own_nonce: &[u8; NONCE_BYTES],
        role: u8,
    ) -> [u8; PROOF_BYTES] {
        self.mac(side, peer_nonce, own_nonce, role)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks, in constant time, a proof made by [`Secret::proof`].
    pub fn verify(
        &self,
        side: Side,
        peer_nonce: &[u8; NONCE_BYTES],
        own_nonce: &[u8; NONCE_BYTES],
        role: u8,
        proof: &[u8],
    ) -> bool {
        self.mac(side, peer_nonce, own_nonce, role).verify_slice(proof).is_ok()
    }

    fn mac(&self, side: Side, peer_nonce: &[u8; NONCE_BYTES], own_nonce: &[u8; NONCE_BYTES], role: u8) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0[..]).expect("HMAC takes a key of any length");
        mac.update(match side {
            Side::Server => b"rama-server-v1",
            Side::Client => b"rama-client-v1",
        });
        mac.update(peer_nonce);
        mac.update(own_nonce);
        mac.update(&[role]);
        mac
    }
}

/// A fresh handshake nonce.
pub fn nonce() -> [u8; NONCE_BYTES] {
    let mut n = [0u8; NONCE_BYTES];
    random(&mut n);
    n
}

/// Fills `buf` from the kernel's random source.
fn random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into the
        // remaining part of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else {
            let e = std::io::Error::last_os_error();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::Interrupted,
                "the kernel's random source must work: {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_the_secret_side_nonces_and_role() {
        let s = Secret::generate();
        let (a, b) = (nonce(), nonce());
        let p = s.proof(Side::Server, &a, &b, 0);
        assert!(s.verify(Side::Server, &a, &b, 0, &p));
        assert!(
            !s.verify(Side::Client, &a, &b, 0, &p),
            "a server proof is no client proof"
        );
        assert!(!s.verify(Side::Server, &b, &a, 0, &p), "nonces are ordered");
        assert!(!s.verify(Side::Server, &a, &b, 1, &p), "the role is bound");
        assert!(
            !Secret::generate().verify(Side::Server, &a, &b, 0, &p),
            "another secret"
        );
        assert!(!s.verify(Side::Server, &a, &b, 0, &p[..31]), "a short proof");
    }

    #[test]
    fn secret_files_are_private_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("cluster.secret");
        assert!(matches!(Secret::load(&path), Err(SecretError::Missing { .. })));
        let made = Secret::create(&path, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = Secret::load(&path).unwrap();
        assert_eq!(made.0, loaded.0);
        assert!(matches!(Secret::create(&path, false), Err(SecretError::Exists { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::load(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::write(&path, "abc\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(Secret::load(&path), Err(SecretError::Malformed { .. })));
        std::fs::write(&path, format!("{}\n", "zz".repeat(32))).unwrap();
        assert!(matches!(Secret::load(&path), Err(SecretError::Malformed { .. })));
    }
}
