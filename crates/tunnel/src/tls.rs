//! TLS configurations for both ends of a tunnel (rustls with the ring provider).
//!
//! The agent trusts exactly what its manifest names ([`CaTrust`]): a CA certificate in
//! PEM, or a `sha256:HEX` pin of the CA's SubjectPublicKeyInfo (the form kubeadm's
//! `--discovery-token-ca-cert-hash` uses) or of the whole CA certificate. A pinned CA
//! must be sent by the server in its chain; the chain is then verified against it as
//! usual, hostname included.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::TunnelError;

/// The crypto provider every Tower TLS config uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate from PEM text.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TunnelError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TunnelError::Tls(format!("reading PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(TunnelError::Tls("no certificate found in PEM".into()));
    }
    Ok(certs)
}

/// Reads the first private key from PEM text.
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TunnelError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| TunnelError::Tls(format!("reading PEM private key: {e}")))?
        .ok_or_else(|| TunnelError::Tls("no private key found in PEM".into()))
}

/// A server's TLS configuration: its chain (leaf first, then the CA so that pinned
/// agents can find it) and key; ALPN `http/1.1`.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TunnelError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TunnelError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TunnelError::Tls(format!("server certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What an agent trusts.
#[derive(Clone, Debug)]
pub enum CaTrust {
    /// These CA certificates.
    Certificates(Vec<CertificateDer<'static>>),
    /// A CA whose SPKI or certificate has this SHA-256.
    Pin([u8; 32]),
    /// Any certificate at all (`--insecure-skip-tls-verify`): the handshake's signatures
    /// are still checked, but not who made the certificate, so anyone on the path can be
    /// the server. Only for an agent given no CA and a token that names none.
    InsecureAnyServer,
}

impl CaTrust {
    /// Parses `sha256:HEX` (64 hex digits).
    pub fn parse_pin(text: &str) -> Result<Self, TunnelError> {
        let hex_digits = text
            .trim()
            .strip_prefix("sha256:")
            .ok_or_else(|| TunnelError::Tls("a CA pin must start with \"sha256:\"".into()))?;
        let bytes = hex::decode(hex_digits)
            .map_err(|_| TunnelError::Tls("a CA pin is sha256: and 64 hex digits".into()))?;
        let pin: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TunnelError::Tls("a CA pin is sha256: and 64 hex digits".into()))?;
        Ok(CaTrust::Pin(pin))
    }
}

/// `sha256:HEX` of a certificate's SubjectPublicKeyInfo: the pin agents accept.
pub fn spki_pin(cert: &CertificateDer<'_>) -> Result<String, TunnelError> {
    Ok(format!("sha256:{}", hex::encode(spki_sha256(cert)?)))
}

fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], TunnelError> {
    let anchor = webpki::anchor_from_trusted_cert(cert)
        .map_err(|e| TunnelError::Tls(format!("parsing certificate: {e:?}")))?;
    // webpki hands out the SPKI's contents; the pin covers the whole DER SEQUENCE.
    let contents: &[u8] = anchor.subject_public_key_info.as_ref();
    let mut der = vec![0x30];
    let len = contents.len();
    if len < 0x80 {
        der.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        der.push(0x80 | (bytes.len() - skip) as u8);
        der.extend_from_slice(&bytes[skip..]);
    }
    der.extend_from_slice(contents);
    Ok(Sha256::digest(&der).into())
}

/// The agent's TLS configuration for dialing the server.
pub fn client_config(trust: &CaTrust) -> Result<Arc<ClientConfig>, TunnelError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TunnelError::Tls(e.to_string()))?;
    let mut config = match trust {
        CaTrust::Certificates(certs) => builder
            .with_root_certificates(roots(certs)?)
            .with_no_client_auth(),
        CaTrust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier { pin: *pin }))
            .with_no_client_auth(),
        CaTrust::InsecureAnyServer => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn roots(certs: &[CertificateDer<'static>]) -> Result<RootCertStore, TunnelError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert.clone())
            .map_err(|e| TunnelError::Tls(format!("CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The handshake-signature half of a [`ServerCertVerifier`], the same for every verifier
/// here: checked with the provider's algorithms, whoever made the certificate.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &provider().signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &provider().signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Accepts any server certificate; checks only that the handshake was signed with its
/// key ([`CaTrust::InsecureAnyServer`]).
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Finds the pinned CA in the presented chain, then verifies the chain against it.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
}

impl PinnedCaVerifier {
    fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let whole: [u8; 32] = Sha256::digest(cert.as_ref()).into();
        whole == self.pin || spki_sha256(cert).is_ok_and(|spki| spki == self.pin)
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| self.matches(c)) else {
            // Fail closed, saying what was expected and what came, so an operator can
            // tell a wrong pin from a server that is not Tower.
            let presented: Vec<String> = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| spki_pin(c).unwrap_or_else(|_| "(unparsable certificate)".into()))
                .collect();
            return Err(rustls::Error::General(format!(
                "the server's certificate chain does not contain the pinned CA: expected \
                 sha256:{}, the chain's keys are {}",
                hex::encode(self.pin),
                presented.join(", ")
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    handshake_signatures!();
}

/// A freshly generated CA and a serving certificate it signed (for tests and for
/// `tower-server`'s first start).
#[derive(Debug, Clone)]
pub struct GeneratedPki {
    /// The CA certificate, PEM.
    pub ca_cert_pem: String,
    /// The CA key, PEM.
    pub ca_key_pem: String,
    /// The serving certificate, PEM.
    pub cert_pem: String,
    /// The serving key, PEM.
    pub key_pem: String,
}

impl GeneratedPki {
    /// A new CA (`common_name`) and a serving certificate for `sans` (DNS names or IPs).
    pub fn generate(common_name: &str, sans: &[String]) -> Result<Self, TunnelError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let err = |e: rcgen::Error| TunnelError::Tls(format!("generating certificates: {e}"));
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let (cert_pem, key_pem) = issue_serving(&issuer, &format!("{common_name} serving"), sans)?;
        Ok(GeneratedPki {
            ca_cert_pem: ca_cert.pem(),
            ca_key_pem: issuer.key().serialize_pem(),
            cert_pem,
            key_pem,
        })
    }
}

/// A new serving certificate and key (PEM) for `sans` (DNS names or IPs), issued by
/// `issuer`: valid until 2099, for server and client authentication.
pub fn issue_serving(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    common_name: &str,
    sans: &[String],
) -> Result<(String, String), TunnelError> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let err = |e: rcgen::Error| TunnelError::Tls(format!("issuing a serving certificate: {e}"));
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(sans.to_vec()).map_err(err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, issuer).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pins_parse_and_refuse_bad_forms() {
        assert!(CaTrust::parse_pin(&format!("sha256:{}", "ab".repeat(32))).is_ok());
        for bad in ["abcd", "sha256:zz", "sha256:abcd", "md5:00"] {
            assert!(CaTrust::parse_pin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_pki_builds_configs_and_pins() {
        let pki =
            GeneratedPki::generate("test", &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let ca = certs_from_pem(pki.ca_cert_pem.as_bytes()).unwrap();
        let pin = spki_pin(&ca[0]).unwrap();
        assert!(pin.starts_with("sha256:") && pin.len() == 7 + 64);
        let mut chain = certs_from_pem(pki.cert_pem.as_bytes()).unwrap();
        chain.extend(ca.clone());
        server_config(chain, key_from_pem(pki.key_pem.as_bytes()).unwrap()).unwrap();
        client_config(&CaTrust::Certificates(ca)).unwrap();
        client_config(&CaTrust::parse_pin(&pin).unwrap()).unwrap();
    }

    #[test]
    fn a_pin_is_the_sha256_of_the_ca_spki_or_of_the_whole_certificate() {
        let names = ["localhost".to_owned()];
        let pki = GeneratedPki::generate("test", &names).unwrap();
        let other = GeneratedPki::generate("test", &names).unwrap();
        let ca = certs_from_pem(pki.ca_cert_pem.as_bytes()).unwrap();
        // The kubeadm form, computed independently: the SHA-256 of the CA key's
        // DER-encoded SubjectPublicKeyInfo.
        let key = rcgen::KeyPair::from_pem(&pki.ca_key_pem).unwrap();
        let spki: [u8; 32] =
            Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(&key)).into();
        assert_eq!(
            spki_pin(&ca[0]).unwrap(),
            format!("sha256:{}", hex::encode(spki))
        );
        let whole: [u8; 32] = Sha256::digest(ca[0].as_ref()).into();

        let mut chain = certs_from_pem(pki.cert_pem.as_bytes()).unwrap();
        chain.extend(ca.clone());
        let verify = |pin: [u8; 32]| {
            PinnedCaVerifier { pin }.verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from("localhost").unwrap(),
                &[],
                UnixTime::now(),
            )
        };
        assert!(verify(spki).is_ok());
        assert!(verify(whole).is_ok());
        // Another CA's pins, and a pin of the serving certificate itself, are refused.
        let other_ca = certs_from_pem(other.ca_cert_pem.as_bytes()).unwrap();
        let leaf: [u8; 32] = Sha256::digest(chain[0].as_ref()).into();
        let ca_pin = spki_pin(&ca[0]).unwrap();
        for pin in [Sha256::digest(other_ca[0].as_ref()).into(), leaf] {
            let refused = verify(pin).unwrap_err().to_string();
            // What was expected and what came, so a wrong pin is told from a wrong server.
            assert!(
                refused.contains("does not contain the pinned CA")
                    && refused.contains(&format!("expected sha256:{}", hex::encode(pin)))
                    && refused.contains(&ca_pin),
                "{refused}"
            );
        }
    }
}
