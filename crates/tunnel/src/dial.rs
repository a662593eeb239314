//! The agent's side of opening a tunnel: TCP (optionally through an HTTP CONNECT proxy),
//! TLS, then the `GET /v1/tunnel` upgrade.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_proto::handshake::{self, ServerHello};

use crate::TunnelError;

/// Where and how to dial.
#[derive(Clone, Debug)]
pub struct DialConfig {
    /// The server's host (name or IP literal).
    pub host: String,
    /// The server's port.
    pub port: u16,
    /// TLS toward the server; `None` only with the explicit plaintext flag.
    pub tls: Option<Arc<ClientConfig>>,
    /// An HTTP CONNECT proxy to go through, if any.
    pub proxy: Option<ProxyUrl>,
    /// The agent token (sent as a bearer token).
    pub token: String,
    /// The agent's `--name`.
    pub cluster: String,
    /// The agent's version.
    pub agent_version: String,
    /// The targets the agent serves.
    pub targets: Vec<String>,
    /// How long TCP connect, proxy, TLS and the upgrade may take together.
    pub timeout: Duration,
}

/// A parsed `--proxy-server` address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerAddress {
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port (8080 unless given).
    pub port: u16,
    /// Whether the URL said `http://` (the agent still uses TLS unless told otherwise).
    pub plaintext_scheme: bool,
}

impl ServerAddress {
    /// Parses `https://host[:port]`, `http://host[:port]` or `host:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let with_scheme = if text.contains("://") {
            text.to_owned()
        } else {
            format!("https://{text}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        let plaintext_scheme = match uri.scheme_str() {
            Some("https") => false,
            Some("http") => true,
            other => return Err(format!("unsupported scheme {other:?}: use https://")),
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("{text:?} names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if !matches!(uri.path(), "" | "/") {
            return Err(format!("{text:?}: a proxy address has no path"));
        }
        Ok(ServerAddress {
            host,
            port: uri.port_u16().unwrap_or(8080),
            plaintext_scheme,
        })
    }
}

/// An HTTP proxy reached with CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Proxy host.
    pub host: String,
    /// Proxy port.
    pub port: u16,
    /// `user:password` for `Proxy-Authorization: Basic`, if the URL carried one.
    pub credentials: Option<String>,
}

impl ProxyUrl {
    /// Parses `http://[user:pass@]host[:port]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let with_scheme = if text.contains("://") {
            text.to_owned()
        } else {
            format!("http://{text}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e| format!("proxy {text:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "proxy {text:?}: only http:// proxies are supported"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("proxy {text:?} names no host"))?;
        let credentials = authority
            .as_str()
            .rsplit_once('@')
            .map(|(userinfo, _)| userinfo.to_owned());
        Ok(ProxyUrl {
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: authority.port_u16().unwrap_or(80),
            credentials,
        })
    }

    /// The proxy that `HTTPS_PROXY`/`NO_PROXY` (or their lowercase forms) choose for
    /// `host`, if any.
    pub fn from_env(host: &str) -> Result<Option<Self>, String> {
        let var = |name: &str| {
            std::env::var(name)
                .or_else(|_| std::env::var(name.to_lowercase()))
                .ok()
                .filter(|v| !v.trim().is_empty())
        };
        let Some(proxy) = var("HTTPS_PROXY") else {
            return Ok(None);
        };
        if var("NO_PROXY").is_some_and(|list| no_proxy_matches(&list, host)) {
            return Ok(None);
        }
        ProxyUrl::parse(&proxy).map(Some)
    }
}

/// Whether a `NO_PROXY` list exempts `host`: `*`, an exact host or IP, or a domain
/// suffix (`example.com` and `.example.com` both cover `a.example.com`).
pub fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    list.split(',')
        .map(|entry| entry.trim().to_ascii_lowercase())
        .filter(|entry| !entry.is_empty())
        .any(|entry| {
            let entry = entry
                .rsplit_once(':')
                .filter(|(_, port)| {
                    port.chars().all(|c| c.is_ascii_digit()) && !entry.contains(']')
                })
                .map_or(entry.as_str(), |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            entry == "*"
                || host == entry.trim_start_matches('.')
                || host.ends_with(&format!(".{}", entry.trim_start_matches('.')))
        })
}

/// A tunnel the server accepted: its hello and the upgraded connection, ready for yamux.
pub struct Dialed {
    /// What the server said in its 101.
    pub hello: ServerHello,
    /// The upgraded connection.
    pub io: TokioIo<Upgraded>,
}

impl std::fmt::Debug for Dialed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialed")
            .field("hello", &self.hello)
            .finish()
    }
}

/// Dials the server and performs the tunnel upgrade, telling it which replicas (by id)
/// this agent already holds.
pub async fn dial(config: &DialConfig, held: &[String]) -> Result<Dialed, TunnelError> {
    tokio::time::timeout(config.timeout, dial_inner(config, held))
        .await
        .map_err(|_| TunnelError::Timeout("dialing the tunnel server"))?
}

async fn dial_inner(config: &DialConfig, held: &[String]) -> Result<Dialed, TunnelError> {
    let tcp = match &config.proxy {
        None => connect_tcp(&config.host, config.port).await?,
        Some(proxy) => {
            let mut tcp = connect_tcp(&proxy.host, proxy.port).await?;
            connect_through_proxy(&mut tcp, proxy, &config.host, config.port).await?;
            tcp
        }
    };
    match &config.tls {
        Some(tls) => {
            let name = ServerName::try_from(config.host.clone())
                .map_err(|e| TunnelError::Tls(format!("server name {:?}: {e}", config.host)))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| TunnelError::Tls(format!("handshake with {}: {e}", config.host)))?;
            upgrade(stream, config, held).await
        }
        None => upgrade(tcp, config, held).await,
    }
}

async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, TunnelError> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| TunnelError::io(format!("connecting to {host}:{port}"), e))?;
    tcp.set_nodelay(true)
        .map_err(|e| TunnelError::io("setting TCP_NODELAY", e))?;
    Ok(tcp)
}

/// Sends `CONNECT host:port` and reads the proxy's answer, byte by byte so that nothing
/// after its header is consumed.
pub async fn connect_through_proxy<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    proxy: &ProxyUrl,
    host: &str,
    port: u16,
) -> Result<(), TunnelError> {
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(credentials) = &proxy.credentials {
        use base64::Engine;
        request.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(credentials.as_bytes())
        ));
    }
    request.push_str("\r\n");
    io.write_all(request.as_bytes())
        .await
        .map_err(|e| TunnelError::io("writing CONNECT to the proxy", e))?;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8 * 1024 {
            return Err(TunnelError::Protocol(
                "proxy answer header is too long".into(),
            ));
        }
        let byte = io
            .read_u8()
            .await
            .map_err(|e| TunnelError::io("reading the proxy's CONNECT answer", e))?;
        head.push(byte);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1);
    if code.is_some_and(|c| c.starts_with('2')) {
        Ok(())
    } else {
        Err(TunnelError::Protocol(format!(
            "proxy {}:{} refused CONNECT {target}: {status_line}",
            proxy.host, proxy.port
        )))
    }
}

async fn upgrade<S>(io: S, config: &DialConfig, held: &[String]) -> Result<Dialed, TunnelError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| TunnelError::Protocol(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "tunnel handshake connection ended");
        }
    });
    let authority = if config.host.contains(':') {
        format!("[{}]:{}", config.host, config.port)
    } else {
        format!("{}:{}", config.host, config.port)
    };
    let request = Request::get(handshake::TUNNEL_PATH)
        .header(header::HOST, authority)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, handshake::UPGRADE_PROTOCOL)
        .header(header::AUTHORIZATION, format!("Bearer {}", config.token))
        .header(handshake::HEADER_CLUSTER, &config.cluster)
        .header(handshake::HEADER_AGENT_VERSION, &config.agent_version)
        .header(
            handshake::HEADER_CAPABILITIES,
            handshake::CAPABILITIES.join(","),
        )
        .header(handshake::HEADER_TARGETS, config.targets.join(","))
        .header(handshake::HEADER_HELD, held.join(","))
        .body(Empty::<Bytes>::new())
        .map_err(|e| TunnelError::Protocol(format!("building the upgrade request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| TunnelError::Protocol(format!("tunnel upgrade: {e}")))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), 4096)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(TunnelError::Refused {
            status,
            reason: String::from_utf8_lossy(&body).trim().to_owned(),
        });
    }
    let hello = ServerHello::from_headers(|name| {
        response.headers().get(name).and_then(|v| v.to_str().ok())
    })
    .map_err(|bad| TunnelError::Protocol(format!("101 without a valid {bad} header")))?;
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| TunnelError::Protocol(format!("tunnel upgrade: {e}")))?;
    Ok(Dialed {
        hello,
        io: TokioIo::new(upgraded),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn server_addresses_parse_like_agent_yaml_writes_them() {
        assert_eq!(
            ServerAddress::parse("http://139.198.120.120:8080").unwrap(),
            ServerAddress {
                host: "139.198.120.120".into(),
                port: 8080,
                plaintext_scheme: true
            }
        );
        let v6 = ServerAddress::parse("https://[::1]:9000").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9000));
        assert_eq!(
            ServerAddress::parse("tower.example.com").unwrap().port,
            8080
        );
        assert!(ServerAddress::parse("ftp://x").is_err());
        assert!(ServerAddress::parse("https://x/path").is_err());
    }

    #[test]
    fn proxy_urls_and_no_proxy() {
        let p = ProxyUrl::parse("http://user:pw@proxy.corp:3128").unwrap();
        assert_eq!(p.host, "proxy.corp");
        assert_eq!(p.port, 3128);
        assert_eq!(p.credentials.as_deref(), Some("user:pw"));
        assert!(ProxyUrl::parse("socks5://x").is_err());
        assert!(no_proxy_matches(
            "localhost,.corp.example",
            "a.corp.example"
        ));
        assert!(no_proxy_matches("corp.example", "corp.example"));
        assert!(no_proxy_matches("10.0.0.1:8080", "10.0.0.1"));
        assert!(no_proxy_matches("*", "anything"));
        assert!(!no_proxy_matches("corp.example", "evilcorp.example"));
        assert!(!no_proxy_matches("", "host"));
    }
}
