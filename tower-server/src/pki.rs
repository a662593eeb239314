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

impl TlsMaterial {
    /// The pin (`sha256:HEX` of its SubjectPublicKeyInfo) of the CA agents should trust:
    /// the first certificate of `ca_pem`. Agent tokens carry it.
    pub fn ca_pin(&self) -> Option<String> {
        let certs = tower_tunnel::tls::certs_from_pem(self.ca_pem.as_bytes()).ok()?;
        tower_tunnel::tls::spki_pin(certs.first()?).ok()
    }
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
///
/// A CA kept in `state_dir` is never replaced: agents pin it. When its serving
/// certificate is missing, unreadable, not issued by that CA or does not cover `sans`, a
/// new one is issued from the kept CA. Half a CA (only `ca.crt` or only `ca.key`) is an
/// error rather than a reason to generate a new one.
pub fn load_or_generate(
    own: Option<&OwnFiles>,
    state_dir: &Path,
    sans: &[String],
) -> Result<TlsMaterial, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let (cert_pem, key_pem, ca_pem) = match own {
        Some(own) => (read(&own.cert)?, read(&own.key)?, read(&own.ca)?),
        None => {
            ensure_state(state_dir, sans)?;
            let file = |name: &str| read(&state_dir.join(name));
            (file(CERT)?, file(KEY)?, file(CA_CERT)?)
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

/// Makes `dir` hold a CA and a serving certificate it issued for `sans`, keeping the CA
/// when there is one.
fn ensure_state(dir: &Path, sans: &[String]) -> Result<(), String> {
    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    match (ca_cert.exists(), ca_key.exists()) {
        (false, false) => return generate(dir, sans),
        // `generate` writes ca.key, then ca.crt, then the serving pair: a key alone with
        // no serving certificate is a first start that stopped half way. No agent can
        // trust a CA certificate that was never written, so start again.
        (false, true) if !dir.join(CERT).exists() => {
            tracing::warn!(dir = %dir.display(), "an earlier first start stopped before writing {CA_CERT}: generating anew");
            return generate(dir, sans);
        }
        (true, true) => {}
        (has_cert, _) => {
            let (present, missing) = if has_cert {
                (&ca_cert, &ca_key)
            } else {
                (&ca_key, &ca_cert)
            };
            return Err(format!(
                "{} is missing but {} exists: refusing to generate a new CA over it, which would cut off every agent that trusts the old one; restore {}, or remove {} to start over with a new CA (and give every agent the new ca.crt)",
                missing.display(),
                present.display(),
                missing.display(),
                present.display(),
            ));
        }
    }
    let read =
        |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let (ca_pem, ca_key_pem) = (read(&ca_cert)?, read(&ca_key)?);
    let ca = tls::certs_from_pem(ca_pem.as_bytes())
        .map_err(|e| format!("{}: {e}", ca_cert.display()))?;
    let (cert_path, key_path) = (dir.join(CERT), dir.join(KEY));
    let reason = match (read(&cert_path), read(&key_path)) {
        (Ok(cert), Ok(key)) => serving_problem(&cert, &key, &ca, sans),
        (Err(e), _) | (_, Err(e)) => Some(e),
    };
    let Some(reason) = reason else {
        return Ok(());
    };
    // Issued and checked in memory: a CA key that does not belong to ca.crt must not
    // cost a serving certificate that still works for the names it has.
    let (cert_pem, key_pem) = issue(dir, &ca_pem, &ca_key_pem, sans)?;
    if let Some(still) = serving_problem(&cert_pem, &key_pem, &ca, sans) {
        return Err(format!(
            "a serving certificate issued from {} does not verify ({still}): does {} belong to it?",
            ca_cert.display(),
            ca_key.display()
        ));
    }
    // The key first: a crash between the two leaves a pair that does not match, which
    // the next start notices and mends.
    write_file(&key_path, key_pem.as_bytes(), true)?;
    write_file(&cert_path, cert_pem.as_bytes(), false)?;
    tracing::info!(dir = %dir.display(), %reason, sans = ?sans, "issued a new serving certificate from the existing CA");
    Ok(())
}

/// Why a serving certificate and key (PEM) cannot be used as they are, if they cannot:
/// unreadable, the key not matching, not issued by `ca` (or expired), or not covering
/// one of `sans`.
fn serving_problem(
    cert_pem: &str,
    key_pem: &str,
    ca: &[CertificateDer<'static>],
    sans: &[String],
) -> Option<String> {
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    let load = || -> Result<_, String> {
        let chain = tls::certs_from_pem(cert_pem.as_bytes()).map_err(|e| format!("{CERT}: {e}"))?;
        let key = tls::key_from_pem(key_pem.as_bytes()).map_err(|e| format!("{KEY}: {e}"))?;
        rustls::sign::CertifiedKey::from_der(chain.clone(), key, &tls::provider())
            .map_err(|e| format!("{CERT} and {KEY}: {e}"))?;
        Ok(chain)
    };
    let chain = match load() {
        Ok(chain) => chain,
        Err(e) => return Some(e),
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in ca {
        if let Err(e) = roots.add(cert.clone()) {
            return Some(format!("{CA_CERT}: {e}"));
        }
    }
    let verifier = match WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        tls::provider(),
    )
    .build()
    {
        Ok(verifier) => verifier,
        Err(e) => return Some(format!("{CA_CERT}: {e}")),
    };
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Some(format!("{CERT} holds no certificate"));
    };
    // A wildcard is checked with a name it covers; names a client could not ask for (a
    // host name with `_`) are left out.
    let names = sans.iter().filter_map(|san| {
        let probe = match san.strip_prefix("*.") {
            Some(parent) => format!("wildcard-probe.{parent}"),
            None => san.clone(),
        };
        Some((san, ServerName::try_from(probe).ok()?))
    });
    for (san, name) in names {
        if let Err(e) =
            verifier.verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
        {
            return Some(format!(
                "{CERT} does not verify for {san:?} against {CA_CERT}: {e}"
            ));
        }
    }
    None
}

/// A new serving certificate and key (PEM) for `sans`, issued by the CA in `ca_pem`.
fn issue(
    dir: &Path,
    ca_pem: &str,
    ca_key_pem: &str,
    sans: &[String],
) -> Result<(String, String), String> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem)
        .map_err(|e| format!("{}: {e}", dir.join(CA_KEY).display()))?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca_pem, ca_key)
        .map_err(|e| format!("{}: {e}", dir.join(CA_CERT).display()))?;
    tls::issue_serving(&issuer, "tower serving", sans).map_err(|e| e.to_string())
}

fn generate(dir: &Path, sans: &[String]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let pki = GeneratedPki::generate("tower", sans).map_err(|e| e.to_string())?;
    // In this order, each file whole or not at all: a start that stops half way leaves
    // a state the next start recognises (see `ensure_state`).
    for (name, content, secret) in [
        (CA_KEY, &pki.ca_key_pem, true),
        (CA_CERT, &pki.ca_cert_pem, false),
        (KEY, &pki.key_pem, true),
        (CERT, &pki.cert_pem, false),
    ] {
        write_file(&dir.join(name), content.as_bytes(), secret)?;
    }
    tracing::info!(dir = %dir.display(), sans = ?sans, "generated a CA and serving certificate");
    Ok(())
}

/// Writes `path` whole or not at all: a temporary file beside it, flushed, then renamed.
fn write_file(path: &Path, content: &[u8], secret: bool) -> Result<(), String> {
    use std::io::Write;
    let err = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&temporary).map_err(err)?;
    file.write_all(content).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&temporary, path).map_err(err)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A scratch state dir, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "tower-pki-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            Dir(path)
        }
        fn file(&self, name: &str) -> Vec<u8> {
            std::fs::read(self.0.join(name)).unwrap()
        }
        fn write(&self, name: &str, content: &str) {
            std::fs::write(self.0.join(name), content).unwrap();
        }
        fn remove(&self, name: &str) {
            std::fs::remove_file(self.0.join(name)).unwrap();
        }
        fn load(&self, sans: &[&str]) -> Result<TlsMaterial, String> {
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            load_or_generate(None, &self.0, &sans)
        }
        /// Whether the state dir's serving certificate is issued by its CA for `sans`.
        fn serves(&self, sans: &[&str]) -> bool {
            let ca = tls::certs_from_pem(&self.file(CA_CERT)).unwrap();
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let text = |name| std::fs::read_to_string(self.0.join(name));
            match (text(CERT), text(KEY)) {
                (Ok(cert), Ok(key)) => serving_problem(&cert, &key, &ca, &sans).is_none(),
                _ => false,
            }
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SANS: &[&str] = &["localhost", "127.0.0.1", "tower.ke-system.svc"];

    #[test]
    fn a_fresh_state_dir_gets_a_ca_and_a_certificate_kept_on_later_starts() {
        let dir = Dir::new("fresh");
        let first = dir.load(SANS).unwrap();
        assert_eq!(first.chain.len(), 2, "leaf, then the CA");
        assert!(dir.serves(SANS));
        let files = [CA_CERT, CA_KEY, CERT, KEY].map(|f| dir.file(f));
        let again = dir.load(SANS).unwrap();
        assert_eq!([CA_CERT, CA_KEY, CERT, KEY].map(|f| dir.file(f)), files);
        assert_eq!(again.ca_pem, first.ca_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.0.join(CA_KEY))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_missing_or_broken_serving_certificate_is_reissued_from_the_kept_ca() {
        let dir = Dir::new("reissue");
        dir.load(SANS).unwrap();
        let (ca, ca_key) = (dir.file(CA_CERT), dir.file(CA_KEY));
        let mut leaf = dir.file(CERT);
        let other = GeneratedPki::generate("other", &["localhost".into()]).unwrap();
        let breakages: [(&str, &dyn Fn()); 5] = [
            ("tls.crt missing", &|| dir.remove(CERT)),
            ("tls.key missing", &|| dir.remove(KEY)),
            ("tls.crt garbage", &|| dir.write(CERT, "not a certificate")),
            ("tls.key of another certificate", &|| {
                dir.write(KEY, &other.key_pem)
            }),
            ("issued by another CA", &|| {
                dir.write(CERT, &other.cert_pem);
                dir.write(KEY, &other.key_pem);
            }),
        ];
        for (what, breakage) in breakages {
            breakage();
            assert!(!dir.serves(SANS), "{what}: the breakage is noticed");
            let material = dir.load(SANS).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(dir.file(CA_CERT), ca, "{what}: the CA is kept");
            assert_eq!(dir.file(CA_KEY), ca_key, "{what}: the CA key is kept");
            assert_ne!(dir.file(CERT), leaf, "{what}: a new certificate");
            assert!(
                dir.serves(SANS),
                "{what}: issued by the kept CA for every name"
            );
            assert_eq!(material.ca_pem.as_bytes(), &ca[..]);
            leaf = dir.file(CERT);
        }
    }

    #[test]
    fn new_names_get_a_certificate_that_covers_them_from_the_same_ca() {
        let dir = Dir::new("sans");
        dir.load(SANS).unwrap();
        let ca = dir.file(CA_CERT);
        let leaf = dir.file(CERT);
        // Fewer names than the certificate has: nothing to do.
        dir.load(&SANS[..1]).unwrap();
        assert_eq!(dir.file(CERT), leaf);
        // A new --tls-san or publish address host: re-issued.
        let more = [SANS, &["tower.example.com", "203.0.113.7"]].concat();
        assert!(!dir.serves(&more));
        dir.load(&more).unwrap();
        assert_eq!(dir.file(CA_CERT), ca);
        assert_ne!(dir.file(CERT), leaf);
        assert!(dir.serves(&more));
    }

    #[test]
    fn half_a_ca_is_refused_and_left_alone() {
        for (kept, missing) in [(CA_CERT, CA_KEY), (CA_KEY, CA_CERT)] {
            let dir = Dir::new(&format!("half-{kept}"));
            dir.load(SANS).unwrap();
            let before = dir.file(kept);
            dir.remove(missing);
            let e = dir.load(SANS).unwrap_err();
            assert!(
                e.contains(&format!("{missing} is missing")) && e.contains("refusing"),
                "{e}"
            );
            assert_eq!(dir.file(kept), before, "nothing overwritten");
            assert!(!dir.0.join(missing).exists(), "nothing generated");
        }
    }

    #[test]
    fn a_first_start_that_stopped_after_the_ca_key_starts_again() {
        let dir = Dir::new("stopped-after-ca-key");
        dir.load(SANS).unwrap();
        // What a crash between writing ca.key and ca.crt leaves.
        for name in [CA_CERT, KEY, CERT] {
            dir.remove(name);
        }
        let old_key = dir.file(CA_KEY);
        dir.load(SANS).unwrap();
        assert!(dir.serves(SANS));
        assert_ne!(dir.file(CA_KEY), old_key, "a new CA");
        // With a serving certificate beside it, a lone ca.key is no half-done start.
        dir.remove(CA_CERT);
        assert!(dir.load(SANS).unwrap_err().contains("refusing"));
    }

    #[test]
    fn a_ca_key_that_does_not_sign_for_the_ca_is_an_error_and_costs_nothing() {
        let dir = Dir::new("wrong-ca-key");
        dir.load(SANS).unwrap();
        let other = GeneratedPki::generate("other", &["localhost".into()]).unwrap();
        dir.write(CA_KEY, &other.ca_key_pem);
        let (cert, key) = (dir.file(CERT), dir.file(KEY));
        // A new name needs a new certificate, which the wrong key cannot sign.
        let e = dir.load(&["localhost", "new.example"]).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        // The certificate that still serves the old names was not touched.
        assert_eq!((dir.file(CERT), dir.file(KEY)), (cert, key));
        assert!(dir.serves(SANS));
        dir.remove(CERT);
        assert!(dir.load(SANS).unwrap_err().contains("does not verify"));
    }
}
