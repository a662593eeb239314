//! The agent's side of opening a tunnel: TCP (optionally through an HTTP CONNECT proxy),
//! TLS, then the `GET /v1/tunnel` upgrade.

use std::net::IpAddr;
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

/// An HTTP proxy reached with CONNECT. Its `Debug` hides the credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Proxy host.
    pub host: String,
    /// Proxy port.
    pub port: u16,
    /// `user:password` for `Proxy-Authorization: Basic`, if the URL carried one.
    pub credentials: Option<String>,
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

/// `text` (a proxy URL) with any `user:password@` shown as `***@`, for messages: a proxy
/// variable's password must not reach a pod's log because the URL was wrong.
fn without_userinfo(text: &str) -> String {
    let start = text.find("://").map_or(0, |i| i + 3);
    let end = text[start..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |i| start + i);
    match text[start..end].rfind('@') {
        Some(at) => format!("{}***{}", &text[..start], &text[start + at..]),
        None => text.to_owned(),
    }
}

impl ProxyUrl {
    /// Parses `http://[user:pass@]host[:port]`. Errors never repeat the credentials.
    pub fn parse(text: &str) -> Result<Self, String> {
        let shown = without_userinfo(text);
        let with_scheme = if text.contains("://") {
            text.to_owned()
        } else {
            format!("http://{text}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e| format!("proxy {shown:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "proxy {shown:?}: only http:// proxies are supported"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("proxy {shown:?} names no host"))?;
        // `user:password`, %-escapes decoded (a password may hold `@` or `:` only so).
        let credentials = authority
            .as_str()
            .rsplit_once('@')
            .map(|(userinfo, _)| {
                percent_encoding::percent_decode_str(userinfo)
                    .decode_utf8()
                    .map(|decoded| decoded.into_owned())
                    .map_err(|_| format!("proxy {shown:?}: its user:password is not UTF-8"))
            })
            .transpose()?;
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
    /// `host:port`, if any (see [`ProxyUrl::from_lookup`]).
    pub fn from_env(host: &str, port: u16) -> Result<Option<Self>, String> {
        Self::from_lookup(host, Some(port), |name| std::env::var(name).ok())
    }

    /// The proxy that the variables `lookup` returns choose for `host` (and `port`, when
    /// known), as Go's `net/http` reads them: the proxy is the first non-empty of
    /// `HTTPS_PROXY`, `https_proxy`; the exemptions the first non-empty of `NO_PROXY`,
    /// `no_proxy` (so an empty uppercase variable does not hide a lowercase one). See
    /// [`NoProxy`] for the exemptions' syntax.
    ///
    /// Unlike Go, `localhost` and loopback addresses are not exempt unless listed: the
    /// agent dials one configured address, and a proxy in front of a local server is
    /// something only a test would set up on purpose.
    pub fn from_lookup(
        host: &str,
        port: Option<u16>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, String> {
        let first_set = |names: [&str; 2]| {
            names
                .into_iter()
                .find_map(|name| lookup(name).filter(|v| !v.trim().is_empty()))
        };
        let Some(proxy) = first_set(["HTTPS_PROXY", "https_proxy"]) else {
            return Ok(None);
        };
        if first_set(["NO_PROXY", "no_proxy"])
            .is_some_and(|list| NoProxy::parse(&list).exempts(host, port))
        {
            return Ok(None);
        }
        ProxyUrl::parse(proxy.trim()).map(Some)
    }
}

/// A parsed `NO_PROXY` list, read the way Go's `net/http` (`x/net/http/httpproxy`) reads
/// it, which is what Kubernetes operators set it for.
///
/// Entries are separated by commas, trimmed and compared case-insensitively:
/// * `*` alone exempts every host;
/// * `10.0.0.0/8`, `fd00::/8`: any IP address inside the block (never a host name);
/// * `10.0.0.1`, `::1`, `fd00::1`, `[::1]`: that IP address;
/// * `example.com`: that host and its subdomains (`a.example.com`, not `notexample.com`);
/// * `.example.com`, `*.example.com`: subdomains only (`a.example.com`, not `example.com`);
/// * any host or IP entry may carry a port (`example.com:8443`, `10.0.0.1:8080`,
///   `[::1]:8080`) and then exempts that port only.
///
/// Malformed entries (a bad port, a bad CIDR block) exempt nothing. Host-name entries
/// never match an IP address and IP entries never match a host name: no DNS is involved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<NoProxyEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum NoProxyEntry {
    /// `*`.
    All,
    /// An address block: its network address and prefix length.
    Cidr(IpAddr, u8),
    /// One address, on one port or any.
    Ip(IpAddr, Option<u16>),
    /// A domain, kept with its leading dot (`.example.com`); `and_itself` when the entry
    /// had no leading dot, so that it also matches `example.com` itself.
    Domain {
        suffix: String,
        and_itself: bool,
        port: Option<u16>,
    },
    /// An entry that can match nothing (a bad port, say).
    Never,
}

impl NoProxy {
    /// Parses a comma-separated `NO_PROXY` value; empty entries are ignored.
    pub fn parse(list: &str) -> Self {
        let entries = list
            .split(',')
            .map(|entry| entry.trim().to_ascii_lowercase())
            .filter(|entry| !entry.is_empty())
            .map(|entry| NoProxyEntry::parse(&entry))
            .collect();
        NoProxy { entries }
    }

    /// Whether the list exempts `host` (a name or an IP literal, brackets optional) on
    /// `port`; with `None` (port unknown) an entry's port is not checked.
    pub fn exempts(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let host = unbracket(&host);
        let ip = host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
        let port_ok = |want: &Option<u16>| match (want, port) {
            (None, _) | (_, None) => true,
            (Some(want), Some(port)) => *want == port,
        };
        self.entries.iter().any(|entry| match entry {
            NoProxyEntry::All => true,
            NoProxyEntry::Cidr(net, prefix) => {
                ip.is_some_and(|ip| cidr_contains(*net, *prefix, ip))
            }
            NoProxyEntry::Ip(want, want_port) => ip == Some(*want) && port_ok(want_port),
            NoProxyEntry::Domain {
                suffix,
                and_itself,
                port: want_port,
            } => {
                ip.is_none()
                    && (host.ends_with(suffix.as_str()) || (*and_itself && host == &suffix[1..]))
                    && port_ok(want_port)
            }
            NoProxyEntry::Never => false,
        })
    }
}

impl NoProxyEntry {
    /// Parses one trimmed, lowercased, non-empty entry.
    fn parse(entry: &str) -> Self {
        if entry == "*" {
            return NoProxyEntry::All;
        }
        if let Some((addr, prefix)) = entry.split_once('/') {
            return parse_cidr(addr, prefix).unwrap_or(NoProxyEntry::Never);
        }
        // A bare IP literal first: `fd00::1` must not be read as host `fd00:` port 1.
        if let Ok(ip) = entry.parse::<IpAddr>() {
            return NoProxyEntry::Ip(ip.to_canonical(), None);
        }
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            // `[v6]` or `[v6]:port`.
            let Some((inside, after)) = rest.split_once(']') else {
                return NoProxyEntry::Never;
            };
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':').map(str::parse::<u16>) {
                    Some(Ok(port)) => Some(port),
                    _ => return NoProxyEntry::Never,
                },
            };
            (inside, port)
        } else {
            match entry.split_once(':') {
                None => (entry, None),
                Some((host, port)) => match port.parse::<u16>() {
                    Ok(port) => (host, Some(port)),
                    // Several colons that are not an IPv6 address, or a bad port.
                    Err(_) => return NoProxyEntry::Never,
                },
            }
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            return NoProxyEntry::Ip(ip.to_canonical(), port);
        }
        // `*.example.com` means what `.example.com` does.
        let (suffix, and_itself) = match host.strip_prefix("*.") {
            Some(domain) => (format!(".{domain}"), false),
            None if host.starts_with('.') => (host.to_owned(), false),
            None => (format!(".{host}"), true),
        };
        if suffix.len() < 2 || suffix.contains(['[', ']', '*']) {
            return NoProxyEntry::Never;
        }
        NoProxyEntry::Domain {
            suffix,
            and_itself,
            port,
        }
    }
}

fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Parses `addr/prefix` (the address may be bracketed); `None` when either is invalid.
fn parse_cidr(addr: &str, prefix: &str) -> Option<NoProxyEntry> {
    let addr: IpAddr = unbracket(addr).parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(NoProxyEntry::Cidr(addr, prefix))
}

/// Whether `ip` lies in the block `net/prefix` (of the same address family).
fn cidr_contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
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
                .connect(name, crate::read_ahead::ReadAhead::new(tcp))
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
    #[cfg(target_os = "linux")]
    socket2::SockRef::from(&tcp)
        .set_tcp_notsent_lowat(UNSENT_LIMIT)
        .map_err(|e| TunnelError::io("setting TCP_NOTSENT_LOWAT", e))?;
    Ok(tcp)
}

/// The most the tunnel's socket holds unsent (`TCP_NOTSENT_LOWAT`; Linux). Every stream's
/// next frame waits behind what the socket holds: left alone, the kernel takes up to
/// its send buffer's autotuned size (4 MiB here), and over a WAN a download, whose
/// stream window yamux grows toward four times the bandwidth-delay product, keeps it
/// full. In B8 (50 ms RTT, 400 Mbit/s) a small request during a download took 136 ms
/// without this limit and 76 ms with it (63 ms directly). Past it the bytes wait in
/// yamux, where the session's queue bounds them ([`crate::queued`]), and then in the
/// upstream's socket. 256 KiB is 2 ms of a 1 Gbit/s link, which the session's driver
/// must refill in time: B8's throughput stayed within its spread.
#[cfg(target_os = "linux")]
const UNSENT_LIMIT: u32 = 256 * 1024;

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
        let refusal = response
            .headers()
            .get(handshake::HEADER_REFUSAL)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(32).collect());
        let body = Limited::new(response.into_body(), 4096)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(TunnelError::Refused {
            status,
            reason: String::from_utf8_lossy(&body).trim().to_owned(),
            refusal,
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
    fn proxy_urls_parse() {
        let p = ProxyUrl::parse("http://user:pw@proxy.corp:3128").unwrap();
        assert_eq!(p.host, "proxy.corp");
        assert_eq!(p.port, 3128);
        assert_eq!(p.credentials.as_deref(), Some("user:pw"));
        let escaped = ProxyUrl::parse("http://svc%40corp:p%3Ass@proxy.corp:3128").unwrap();
        assert_eq!(escaped.credentials.as_deref(), Some("svc@corp:p:ss"));
        assert_eq!(ProxyUrl::parse("proxy.corp").unwrap().port, 80);
        assert!(ProxyUrl::parse("socks5://x").is_err());
    }

    #[test]
    fn a_proxy_password_stays_out_of_errors_and_debug() {
        for bad in [
            "https://svc:S3cret@proxy.corp:3128",
            "http://svc:S3cret@proxy corp:3128",
            "socks5://svc:S3cret@proxy.corp/path@x",
        ] {
            let err = ProxyUrl::parse(bad).unwrap_err();
            assert!(!err.contains("S3cret"), "{err}");
            assert!(err.contains("***@proxy"), "{err}");
        }
        let parsed = ProxyUrl::parse("http://svc:S3cret@proxy.corp:3128").unwrap();
        let debug = format!("{parsed:?}");
        assert!(
            !debug.contains("S3cret") && debug.contains("<hidden>"),
            "{debug}"
        );
        assert_eq!(
            without_userinfo("http://proxy.corp:3128"),
            "http://proxy.corp:3128"
        );
        assert_eq!(without_userinfo("u:p@proxy:1"), "***@proxy:1");
    }

    /// Runs [`connect_through_proxy`] against a proxy that answers `answer`; returns
    /// the request the proxy read and the result.
    async fn through_proxy(
        proxy: &str,
        host: &str,
        answer: &'static [u8],
    ) -> (String, Result<(), TunnelError>) {
        let (mut agent, mut proxy_side) = tokio::io::duplex(16 * 1024);
        let proxy_task = tokio::spawn(async move {
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                request.push(proxy_side.read_u8().await.unwrap());
            }
            proxy_side.write_all(answer).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        let result =
            connect_through_proxy(&mut agent, &ProxyUrl::parse(proxy).unwrap(), host, 8080).await;
        (proxy_task.await.unwrap(), result)
    }

    #[tokio::test]
    async fn connect_names_the_target_and_authenticates_to_the_proxy() {
        let (request, result) = through_proxy(
            "http://svc%40corp:p%3Ass@proxy.corp:3128",
            "tower.example.com",
            b"HTTP/1.1 200 Connection established\r\n\r\n",
        )
        .await;
        result.unwrap();
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode("svc@corp:p:ss");
        assert_eq!(
            request,
            format!(
                "CONNECT tower.example.com:8080 HTTP/1.1\r\nHost: tower.example.com:8080\r\n\
                 Proxy-Authorization: Basic {basic}\r\n\r\n"
            )
        );
        // An IPv6 target is bracketed; no credentials, no Proxy-Authorization.
        let (request, result) = through_proxy(
            "http://proxy.corp:3128",
            "fd00::1",
            b"HTTP/1.0 200 OK\r\n\r\n",
        )
        .await;
        result.unwrap();
        assert_eq!(
            request,
            "CONNECT [fd00::1]:8080 HTTP/1.1\r\nHost: [fd00::1]:8080\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_proxy_refusing_connect_is_an_error_naming_it_and_its_answer() {
        for (answer, status) in [
            (
                &b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n"
                    [..],
                "407 Proxy Authentication Required",
            ),
            (&b"HTTP/1.1 403 Forbidden\r\n\r\n"[..], "403 Forbidden"),
        ] {
            let (_, result) =
                through_proxy("http://proxy.corp:3128", "tower.example.com", answer).await;
            let message = result.unwrap_err().to_string();
            assert!(
                message.contains("proxy proxy.corp:3128 refused CONNECT tower.example.com:8080")
                    && message.contains(status),
                "{message}"
            );
        }
    }

    #[tokio::test]
    async fn tunnel_connections_disable_nagle() {
        // Small frames (pings, request heads) must not wait for an ACK of the last one.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tcp = connect_tcp("127.0.0.1", port).await.unwrap();
        assert!(tcp.nodelay().unwrap());
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn tunnel_connections_hold_little_unsent() {
        // A download's frames must not fill the kernel's send buffer ahead of every other
        // stream's (B8 measures what it costs a small request over a WAN).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tcp = connect_tcp("127.0.0.1", port).await.unwrap();
        let unsent = socket2::SockRef::from(&tcp).tcp_notsent_lowat().unwrap();
        assert_eq!(unsent, UNSENT_LIMIT);
    }

    /// `NO_PROXY` exempts `host:port`.
    fn exempt(list: &str, host: &str, port: u16) -> bool {
        NoProxy::parse(list).exempts(host, Some(port))
    }

    #[test]
    fn no_proxy_entries_are_comma_separated_trimmed_and_case_insensitive() {
        let list = " Other.Example , CORP.example ,,";
        assert!(exempt(list, "corp.example", 443));
        assert!(exempt(list, "Corp.Example", 443));
        assert!(exempt(list, "other.example", 443));
        assert!(!exempt(list, "third.example", 443));
        assert!(!exempt("", "host", 443));
        assert!(!exempt(" , ,", "host", 443));
    }

    #[test]
    fn no_proxy_star_alone_exempts_everything() {
        assert!(exempt("*", "anything.example", 443));
        assert!(exempt("*", "10.1.2.3", 8080));
        assert!(exempt("*", "::1", 8080));
        assert!(exempt("corp.example, *", "anything.example", 1));
        // A star inside a name is not a wildcard.
        assert!(!exempt("*example.com", "a.example.com", 443));
        assert!(!exempt("a*", "abc", 443));
    }

    #[test]
    fn no_proxy_domains_match_themselves_and_subdomains_like_go() {
        // A bare domain: itself and its subdomains.
        assert!(exempt("example.com", "example.com", 443));
        assert!(exempt("example.com", "a.example.com", 443));
        assert!(exempt("example.com", "a.b.example.com", 443));
        assert!(!exempt("example.com", "notexample.com", 443));
        assert!(!exempt("example.com", "example.com.evil", 443));
        assert!(!exempt("a.example.com", "example.com", 443));
        // `.example.com` and `*.example.com`: subdomains only, as Go reads them.
        for entry in [".example.com", "*.example.com"] {
            assert!(exempt(entry, "a.example.com", 443), "{entry}");
            assert!(exempt(entry, "a.b.example.com", 443), "{entry}");
            assert!(!exempt(entry, "example.com", 443), "{entry}");
            assert!(!exempt(entry, "notexample.com", 443), "{entry}");
        }
    }

    #[test]
    fn no_proxy_ip_entries_match_v4_and_v6_targets() {
        assert!(exempt("10.0.0.1", "10.0.0.1", 8080));
        assert!(!exempt("10.0.0.1", "10.0.0.10", 8080));
        // Bare IPv6 entries: the colons are not a port.
        assert!(exempt("::1", "::1", 8080));
        assert!(exempt("fd00::1", "fd00::1", 8080));
        assert!(
            exempt("FD00::1", "fd00:0:0::1", 8080),
            "compared as addresses"
        );
        assert!(!exempt("fd00::1", "fd00::2", 8080));
        assert!(!exempt("fd00::1", "fd00::", 1));
        // Bracketed, with or without a port; the target may be bracketed too.
        assert!(exempt("[::1]", "::1", 8080));
        assert!(exempt("[::1]", "[::1]", 8080));
        assert!(exempt("[::1]:8080", "::1", 8080));
        assert!(!exempt("[::1]:8080", "::1", 8443));
        assert!(!exempt("[::1]", "::2", 8080));
        // An IPv4-mapped target is its IPv4 address.
        assert!(exempt("10.0.0.1", "::ffff:10.0.0.1", 8080));
    }

    #[test]
    fn no_proxy_cidr_blocks_match_ip_targets_inside_them() {
        assert!(exempt("10.0.0.0/8", "10.0.0.1", 8080));
        assert!(exempt("10.0.0.0/8", "10.255.255.255", 8080));
        assert!(!exempt("10.0.0.0/8", "11.0.0.1", 8080));
        assert!(!exempt("10.0.0.0/8", "9.255.255.255", 8080));
        assert!(exempt("192.168.1.0/24", "192.168.1.77", 1));
        assert!(!exempt("192.168.1.0/24", "192.168.2.77", 1));
        assert!(exempt("0.0.0.0/0", "203.0.113.9", 1));
        assert!(exempt("10.0.0.1/32", "10.0.0.1", 1));
        assert!(!exempt("10.0.0.1/32", "10.0.0.2", 1));
        assert!(exempt("fd00::/8", "fd12:3456::1", 8080));
        assert!(exempt("fd00::/8", "[fdff::1]", 8080));
        assert!(!exempt("fd00::/8", "fe80::1", 8080));
        assert!(!exempt("fd00::/8", "::1", 8080));
        // Families do not mix, and a host name never matches a block.
        assert!(!exempt("10.0.0.0/8", "fd00::1", 8080));
        assert!(!exempt("fd00::/8", "10.0.0.1", 8080));
        assert!(!exempt("10.0.0.0/8", "10.example.com", 8080));
        assert!(!exempt("10.0.0.0/8", "localhost", 8080));
        // Malformed blocks exempt nothing.
        assert!(!exempt("10.0.0.0/33", "10.0.0.1", 8080));
        assert!(!exempt("10.0.0.0/x", "10.0.0.1", 8080));
        assert!(!exempt("example.com/8", "example.com", 8080));
    }

    #[test]
    fn no_proxy_entries_with_a_port_match_that_port_only() {
        assert!(exempt("example.com:8443", "example.com", 8443));
        assert!(exempt("example.com:8443", "a.example.com", 8443));
        assert!(!exempt("example.com:8443", "example.com", 443));
        assert!(exempt(".example.com:8443", "a.example.com", 8443));
        assert!(!exempt(".example.com:8443", "a.example.com", 8080));
        assert!(exempt("10.0.0.1:8080", "10.0.0.1", 8080));
        assert!(!exempt("10.0.0.1:8080", "10.0.0.1", 9443));
        // Without a port an entry matches every port.
        assert!(exempt("example.com", "example.com", 1));
        assert!(exempt("10.0.0.1", "10.0.0.1", 65535));
        // A bad port makes the entry match nothing.
        assert!(!exempt("example.com:http", "example.com", 80));
        assert!(!exempt("example.com:99999", "example.com", 34463)); // 99999 mod 2^16
        assert!(!exempt("[::1]x", "::1", 80));
    }

    #[test]
    fn host_names_and_ip_entries_do_not_cross() {
        // No DNS: an IP entry never exempts a name, a name entry never exempts an IP.
        assert!(!exempt("127.0.0.1", "localhost", 8080));
        assert!(!exempt("localhost", "127.0.0.1", 8080));
        assert!(!exempt("0.0.1", "10.0.0.1", 8080));
        assert!(!exempt("1", "10.0.0.1", 8080));
    }

    /// The variables of a pretend environment.
    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn proxy_for(vars: &[(&str, &str)], host: &str, port: u16) -> Option<ProxyUrl> {
        ProxyUrl::from_lookup(host, Some(port), env(vars)).unwrap()
    }

    #[test]
    fn https_proxy_uppercase_wins_and_empty_counts_as_unset() {
        let upper = [
            ("HTTPS_PROXY", "http://upper:3128"),
            ("https_proxy", "http://lower:3128"),
        ];
        assert_eq!(proxy_for(&upper, "t.example", 443).unwrap().host, "upper");
        let lower_only = [("https_proxy", "http://lower:3128")];
        assert_eq!(
            proxy_for(&lower_only, "t.example", 443).unwrap().host,
            "lower"
        );
        let empty_upper = [("HTTPS_PROXY", ""), ("https_proxy", "lower:3128")];
        assert_eq!(
            proxy_for(&empty_upper, "t.example", 443).unwrap().host,
            "lower"
        );
        assert_eq!(proxy_for(&[], "t.example", 443), None);
        assert_eq!(proxy_for(&[("HTTPS_PROXY", " ")], "t.example", 443), None);
        // Only HTTPS_PROXY counts: the tunnel is TLS.
        assert_eq!(
            proxy_for(&[("HTTP_PROXY", "http://p:1")], "t.example", 443),
            None
        );
        assert!(ProxyUrl::from_lookup("t", None, env(&[("HTTPS_PROXY", "ftp://p")])).is_err());
    }

    #[test]
    fn no_proxy_uppercase_wins_and_empty_does_not_hide_lowercase() {
        let proxy = ("HTTPS_PROXY", "http://proxy.corp:3128");
        // An empty NO_PROXY does not hide a non-empty no_proxy.
        let vars = [proxy, ("NO_PROXY", ""), ("no_proxy", ".internal")];
        assert_eq!(proxy_for(&vars, "tower.internal", 8080), None);
        assert!(proxy_for(&vars, "tower.example", 8080).is_some());
        let vars = [proxy, ("no_proxy", ".internal")];
        assert_eq!(proxy_for(&vars, "tower.internal", 8080), None);
        // A non-empty NO_PROXY wins over no_proxy.
        let vars = [proxy, ("NO_PROXY", ".example"), ("no_proxy", ".internal")];
        assert!(proxy_for(&vars, "tower.internal", 8080).is_some());
        assert_eq!(proxy_for(&vars, "tower.example", 8080), None);
        // Exemptions take the port into account.
        let vars = [proxy, ("NO_PROXY", "tower.internal:8080")];
        assert_eq!(proxy_for(&vars, "tower.internal", 8080), None);
        assert!(proxy_for(&vars, "tower.internal", 9443).is_some());
        // With the port unknown, a port entry exempts its host on any port.
        assert_eq!(
            ProxyUrl::from_lookup("tower.internal", None, env(&vars)).unwrap(),
            None
        );
        // Loopback is not exempt unless listed (unlike Go): tests proxy a local server.
        assert!(proxy_for(&[proxy], "127.0.0.1", 8080).is_some());
    }
}
