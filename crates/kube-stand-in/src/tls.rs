//! The stand-in's PKI (a CA, a serving certificate, one client certificate) and its rustls
//! server configuration: HTTP/1.1 only, client certificates optional but verified when sent.

use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Common name of the client certificate the stand-in issues.
pub(crate) const CLIENT_CERT_CN: &str = "tower-agent-client";

/// Certificates and keys generated at start.
pub(crate) struct Pki {
    pub(crate) ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_cert_der: CertificateDer<'static>,
    server_key_der: Vec<u8>,
    pub(crate) client_cert_pem: String,
    pub(crate) client_key_pem: String,
}

impl Pki {
    /// Generates a fresh CA, a serving certificate for 127.0.0.1, ::1 and localhost, and a
    /// client certificate with CN [`CLIENT_CERT_CN`].
    pub(crate) fn generate() -> anyhow::Result<Pki> {
        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca_params = CertificateParams::new(Vec::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name = rcgen::DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tower-kube-stand-in-ca");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("self-signing the CA")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().context("generating the serving key")?;
        let mut server_params = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "localhost".to_owned(),
        ])?;
        server_params.distinguished_name = rcgen::DistinguishedName::new();
        server_params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        server_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .context("signing the serving certificate")?;

        let client_key = KeyPair::generate().context("generating the client key")?;
        let mut client_params = CertificateParams::new(Vec::new())?;
        client_params.distinguished_name = rcgen::DistinguishedName::new();
        client_params
            .distinguished_name
            .push(DnType::CommonName, CLIENT_CERT_CN);
        client_params
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        client_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params
            .signed_by(&client_key, &issuer)
            .context("signing the client certificate")?;

        Ok(Pki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            server_cert_der: server_cert.der().clone(),
            server_key_der: server_key.serialize_der(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        })
    }

    /// A rustls server configuration: ring provider, ALPN `h2` and `http/1.1`, optional client
    /// certificates that must chain to the stand-in's CA when presented.
    pub(crate) fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .context("building the client certificate verifier")?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.server_cert_der.clone(), self.ca_der.clone()], key)
            .context("installing the serving certificate")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The subject common name of a DER certificate, if it has one.
#[cfg(test)]
pub(crate) fn subject_common_name(der: &[u8]) -> Option<String> {
    subject_names(der).and_then(|(cn, _)| cn)
}

/// The subject's common name and organizations of a DER certificate: the user and the
/// groups kube-apiserver's x509 authenticator takes from a client certificate
/// (`CommonNameUserConversion` in
/// staging/src/k8s.io/apiserver/pkg/authentication/request/x509/x509.go).
///
/// Walks `Certificate → tbsCertificate → subject` with a minimal DER reader; the stand-in only
/// needs it for certificates its own CA verified.
pub(crate) fn subject_names(der: &[u8]) -> Option<(Option<String>, Vec<String>)> {
    let (_, cert, _) = read_tlv(der)?;
    let (_, mut tbs, _) = read_tlv(cert)?;
    // Optional explicit version [0], then serialNumber.
    let (tag, _, rest) = read_tlv(tbs)?;
    tbs = rest;
    if tag == 0xa0 {
        let (_, _, rest) = read_tlv(tbs)?;
        tbs = rest;
    }
    // signature, issuer, validity
    for _ in 0..3 {
        let (_, _, rest) = read_tlv(tbs)?;
        tbs = rest;
    }
    let (_, mut subject, _) = read_tlv(tbs)?;
    let (mut cn, mut orgs) = (None, Vec::new());
    // subject: SEQUENCE OF SET OF SEQUENCE { OID, value }
    while !subject.is_empty() {
        let (_, set, rest) = read_tlv(subject)?;
        subject = rest;
        let mut set = set;
        while !set.is_empty() {
            let (_, atv, rest) = read_tlv(set)?;
            set = rest;
            let (oid_tag, oid, value) = read_tlv(atv)?;
            let (_, text, _) = read_tlv(value)?;
            let text = String::from_utf8(text.to_vec()).ok();
            match (oid_tag, oid) {
                (0x06, [0x55, 0x04, 0x03]) if cn.is_none() => cn = text,
                (0x06, [0x55, 0x04, 0x0a]) => orgs.extend(text),
                _ => {}
            }
        }
    }
    Some((cn, orgs))
}

/// Reads one DER TLV: returns (tag, contents, rest).
fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_cert_common_name_is_read_back() {
        let pki = Pki::generate().expect("pki");
        let der = rustls_pemfile::certs(&mut pki.client_cert_pem.as_bytes())
            .next()
            .expect("one cert")
            .expect("valid pem");
        assert_eq!(
            subject_common_name(&der).as_deref(),
            Some(CLIENT_CERT_CN),
            "CN of the issued client certificate"
        );
        assert_eq!(
            subject_common_name(&pki.server_cert_der).as_deref(),
            Some("kube-apiserver")
        );
        assert_eq!(
            subject_names(&der).map(|(_, orgs)| orgs),
            Some(vec!["system:masters".to_owned()])
        );
    }
}
