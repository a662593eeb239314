//! The server's TLS material: brought by the operator, or generated on first start under
//! `--state-dir` and reused after.

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tower_tunnel::tls::{self, GeneratedPki};

/// Certificates the listeners serve with.
#[derive(Debug)]
pub struct TlsMaterial {
    /// Leaf first, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
    /// The CA agents and kubeconfigs should trust, PEM.
    pub ca_pem: String,
}

/// Where the operator's own files are.
#[derive(Debug, Clone)]
pub struct OwnFiles {
    /// Serving certificate (PEM; may hold the chain).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The CA that signed it.
    pub ca: PathBuf,
}

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const CERT: &str = "tls.crt";
const KEY: &str = "tls.key";

/// Loads the operator's files, or the state dir's, generating the latter when absent.
pub fn load_or_generate(
    own: Option<&OwnFiles>,
    state_dir: &Path,
    sans: &[String],
) -> Result<TlsMaterial, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let (cert_pem, key_pem, ca_pem) = match own {
        Some(own) => (read(&own.cert)?, read(&own.key)?, read(&own.ca)?),
        None => {
            let files = [CA_CERT, CA_KEY, CERT, KEY].map(|f| state_dir.join(f));
            if !files.iter().all(|f| f.exists()) {
                generate(state_dir, sans)?;
            }
            (read(&files[2])?, read(&files[3])?, read(&files[0])?)
        }
    };
    let mut chain = tls::certs_from_pem(&cert_pem).map_err(|e| e.to_string())?;
    let ca = tls::certs_from_pem(&ca_pem).map_err(|e| e.to_string())?;
    if !chain.iter().any(|c| ca.contains(c)) {
        chain.extend(ca);
    }
    Ok(TlsMaterial {
        chain,
        key: tls::key_from_pem(&key_pem).map_err(|e| e.to_string())?,
        ca_pem: String::from_utf8_lossy(&ca_pem).into_owned(),
    })
}

fn generate(dir: &Path, sans: &[String]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let pki = GeneratedPki::generate("tower", sans).map_err(|e| e.to_string())?;
    for (name, content, secret) in [
        (CA_CERT, &pki.ca_cert_pem, false),
        (CA_KEY, &pki.ca_key_pem, true),
        (CERT, &pki.cert_pem, false),
        (KEY, &pki.key_pem, true),
    ] {
        write_file(&dir.join(name), content.as_bytes(), secret)?;
    }
    tracing::info!(dir = %dir.display(), sans = ?sans, "generated a CA and serving certificate");
    Ok(())
}

fn write_file(path: &Path, content: &[u8], secret: bool) -> Result<(), String> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(path)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    file.write_all(content)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The names a generated certificate covers: loopback, this host, and what was asked.
pub fn default_sans(extra: &[String]) -> Vec<String> {
    let mut sans: Vec<String> = [
        "localhost",
        "127.0.0.1",
        "::1",
        "tower",
        "tower.ke-system.svc",
    ]
    .map(String::from)
    .to_vec();
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        sans.push(host.trim().to_owned());
    }
    sans.extend(extra.iter().cloned());
    sans.retain(|s| !s.is_empty());
    sans.dedup();
    sans
}
