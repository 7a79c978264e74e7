//! One HTTPS GET, the way K3s's agent asks a server for `/cacerts`.
//!
//! rustls (ring provider) straight over a `TcpStream` with a minimal HTTP/1.1 client
//! (`Content-Length`, chunked, or up to EOF), parsed with httparse. Every read and write
//! runs against one deadline. [`get`] asks for `Connection: close`; the join check and a
//! standby's prefetch leave the connection open ([`get_keeping`]), so that the promotion's
//! check after a prefetch is one round trip on the prefetch's connection.
//!
//! Why not ureq, which PID1 already links (plain HTTP, for Hetzner metadata)? Measured
//! with ureq 3.5 `rustls-no-provider` and our ring provider passed in (no aws-lc, no
//! webpki-roots), `disable_verification` for the first fetch, `RootCerts::Specific` for
//! the second, `timeout_global` and a body `limit`, this file's HTTP code removed: the
//! static release basalt-init grows from 5,636,648 to 5,676,920 bytes (+40 KiB; zstd -19
//! 2,121,281 → 2,129,122, +8 KiB). Size is not the reason; these are:
//! - ureq's `disable_verification` also skips the handshake signatures and offers SHA-1
//!   and Ed448 schemes. Go's `InsecureSkipVerify`, which K3s uses here, still checks that
//!   the peer signed the handshake with the key of the certificate it showed;
//!   [`AcceptAnyCertificate`] does the same. ureq takes no custom verifier, short of
//!   writing our own TLS connector against its `unversioned` transport API.
//! - The crypto provider is set through `unversioned_rustls_crypto_provider`, outside
//!   ureq's semver promise; without it (or a process default) ureq panics, in PID1.
//! - A ureq timeout says which of its timeouts fired (`Global`), not which step stalled;
//!   our errors name the step (handshake, send, receive), and the tests check them.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

use super::{CheckTimes, K3sError};

/// Larger response heads are refused.
const MAX_HEAD: usize = 16 * 1024;

/// A K3s server URL as the machine config carries it: `https://host[:port][/path]`.
#[derive(Debug, Clone)]
pub(super) struct Server {
    /// `host[:port]` as written, for the `Host` header and messages.
    authority: String,
    host: String,
    port: u16,
}

impl Server {
    pub(super) fn parse(server: &str) -> Result<Server, K3sError> {
        let bad = |reason| K3sError::BadUrl {
            server: server.to_owned(),
            reason,
        };
        let rest = server
            .strip_prefix("https://")
            .ok_or(bad("only https:// URLs are supported"))?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(bad("user information in the URL is not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(bad("unclosed IPv6 bracket"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None | Some("") => 443,
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
        };
        Ok(Server {
            authority: authority.to_owned(),
            host: host.to_owned(),
            port,
        })
    }

    pub(super) fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.authority)
    }

    pub(super) fn server_name(&self) -> Result<ServerName<'static>, K3sError> {
        match self.host.parse::<IpAddr>() {
            Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
            Err(_) => ServerName::try_from(self.host.clone()).map_err(|_| K3sError::BadUrl {
                server: self.url(""),
                reason: "the host is not a valid DNS name",
            }),
        }
    }
}

/// The ring provider, made once per process.
pub(super) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// The client side of K3s's first `/cacerts` request ([`AcceptAnyCertificate`]): it
/// depends on nothing a join brings, so it is made once per process (a node's standby
/// warm-up makes it, [`super::warm_up`]) and shared by every check after.
pub(super) fn any_certificate_config() -> Result<Arc<ClientConfig>, K3sError> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    if let Some(config) = CONFIG.get() {
        return Ok(Arc::clone(config));
    }
    let verifier = Arc::new(AcceptAnyCertificate(provider()));
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(K3sError::TlsConfig)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::clone(CONFIG.get_or_init(|| Arc::new(config))))
}

/// GET `path` from `server` with `config` on a new connection; the body of a 2xx
/// answer, at most `limit` bytes.
pub(super) fn get(
    server: &Server,
    path: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
    limit: usize,
) -> Result<Vec<u8>, K3sError> {
    let deadline = Instant::now() + timeout;
    let mut tls = open(server, path, config, deadline, &mut CheckTimes::default())?;
    exchange(&mut tls, server, path, limit, false).map(|(body, _)| body)
}

/// A TLS connection to a server that a GET left open (HTTP/1.1 keep-alive), for the
/// next GET to the same server.
pub(super) struct Kept {
    tls: rustls::StreamOwned<ClientConnection, TcpStream>,
}

impl Kept {
    /// Nothing has come in since the last answer: no close_notify, no FIN, no reset.
    /// Read without waiting; a connection the server closed while idle (or anything
    /// unexpected on it) is not used.
    fn quiet(&self) -> bool {
        let sock = &self.tls.sock;
        if sock.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        let quiet = matches!(sock.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        sock.set_nonblocking(false).is_ok() && quiet
    }
}

/// How long a GET on a [`Kept`] connection may take before it is given up for a new
/// connection. An answer on an open connection is one round trip; a connection that has
/// not answered within this is more likely forgotten by something between (a NAT, a
/// firewall, a server that went away without a word) than slow, and the new connection
/// still has the rest of the timeout.
pub(super) const KEPT_PATIENCE: Duration = Duration::from_secs(1);

/// What [`get_keeping`] fetched.
pub(super) struct Fetched {
    pub body: Vec<u8>,
    /// The certificates of the connection the body came over, end entity first.
    pub peer: Vec<CertificateDer<'static>>,
    /// That connection, when the server left it open for another request.
    pub kept: Option<Kept>,
}

/// [`get`] that asks the server to keep the connection open and returns the certificates
/// the server showed in the handshake (whose signature over it `config`'s verifier
/// checked). It first tries `kept`, a connection an earlier GET left open: no connect,
/// no handshake, one round trip. Anything that goes wrong on `kept` (the server closed
/// it, it does not answer within [`KEPT_PATIENCE`], a malformed or refused answer) is
/// forgotten and the GET is made again on a new connection, as it would have been
/// without one: a GET can be repeated, and only the new connection's outcome counts.
/// `times.kept` says whether `kept` answered.
pub(super) fn get_keeping(
    server: &Server,
    path: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
    limit: usize,
    times: &mut CheckTimes,
    kept: Option<Kept>,
) -> Result<Fetched, K3sError> {
    let deadline = Instant::now() + timeout;
    let on_kept = kept.filter(Kept::quiet).and_then(|kept| {
        let mut tls = Deadlined {
            inner: kept.tls,
            deadline: deadline.min(Instant::now() + KEPT_PATIENCE),
        };
        let answer = exchange(&mut tls, server, path, limit, true).ok()?;
        Some((tls, answer))
    });
    times.kept = on_kept.is_some();
    let (tls, (body, reusable)) = match on_kept {
        Some(answered) => answered,
        None => {
            let mut tls = open(server, path, config, deadline, times)?;
            let answer = exchange(&mut tls, server, path, limit, true)?;
            (tls, answer)
        }
    };
    times.response = Some(times.start.elapsed());
    Ok(Fetched {
        body,
        peer: peer_of(&tls),
        kept: reusable.then_some(Kept { tls: tls.inner }),
    })
}

/// A new connection to `server`, its TLS handshake done; errors name `path`'s URL.
fn open(
    server: &Server,
    path: &str,
    config: Arc<ClientConfig>,
    deadline: Instant,
    times: &mut CheckTimes,
) -> Result<Deadlined, K3sError> {
    let url = server.url(path);
    let conn = ClientConnection::new(config, server.server_name()?).map_err(K3sError::TlsConfig)?;
    let sock = connect(server, &url, deadline)?;
    times.connected = Some(times.start.elapsed());
    let mut tls = Deadlined {
        inner: rustls::StreamOwned::new(conn, sock),
        deadline,
    };
    while tls.inner.conn.is_handshaking() {
        tls.arm()
            .and_then(|s| s.conn.complete_io(&mut s.sock))
            .map_err(|source| K3sError::Handshake {
                url: url.clone(),
                source,
            })?;
    }
    times.handshake = Some(times.start.elapsed());
    times.resumed = tls.inner.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    Ok(tls)
}

fn peer_of(tls: &Deadlined) -> Vec<CertificateDer<'static>> {
    tls.inner
        .conn
        .peer_certificates()
        .map(<[CertificateDer<'static>]>::to_vec)
        .unwrap_or_default()
}

/// One request and its answer on `tls`: the body, and whether the connection can carry
/// another request (see [`read_response`]). `keep_alive` leaves out `Connection: close`.
fn exchange(
    tls: &mut Deadlined,
    server: &Server,
    path: &str,
    limit: usize,
    keep_alive: bool,
) -> Result<(Vec<u8>, bool), K3sError> {
    let url = server.url(path);
    let connection = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: basalt\r\nAccept: */*\r\n{connection}\r\n",
        server.authority
    );
    tls.write_all(request.as_bytes())
        .and_then(|()| tls.flush())
        .map_err(|source| K3sError::Send {
            url: url.clone(),
            source,
        })?;
    let (body, reusable) = read_response(tls, &url, limit)?;
    Ok((body, reusable && keep_alive))
}

fn connect(server: &Server, url: &str, deadline: Instant) -> Result<TcpStream, K3sError> {
    let addrs = (server.host.as_str(), server.port)
        .to_socket_addrs()
        .map_err(|source| K3sError::Resolve {
            url: url.to_owned(),
            source,
        })?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
    for addr in addrs {
        let left = remaining(deadline).unwrap_or_default();
        if left.is_zero() {
            last = io::ErrorKind::TimedOut.into();
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                // Best effort: one small request, no need to wait for more data to batch.
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(K3sError::Connect {
        url: url.to_owned(),
        source: last,
    })
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline.checked_duration_since(Instant::now())
}

/// The TLS stream with the socket's timeouts set to what is left before the deadline.
struct Deadlined {
    inner: rustls::StreamOwned<ClientConnection, TcpStream>,
    deadline: Instant,
}

impl Deadlined {
    fn arm(&mut self) -> io::Result<&mut rustls::StreamOwned<ClientConnection, TcpStream>> {
        let left = remaining(self.deadline)
            .filter(|d| !d.is_zero())
            .ok_or(io::ErrorKind::TimedOut)?;
        self.inner.sock.set_read_timeout(Some(left))?;
        self.inner.sock.set_write_timeout(Some(left))?;
        Ok(&mut self.inner)
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.arm()?.flush()
    }
}

/// Bytes read so far and where the body reader stands in them.
struct Incoming<'r, R> {
    reader: &'r mut R,
    buf: Vec<u8>,
    pos: usize,
    url: &'r str,
    limit: usize,
}

impl<R: Read> Incoming<'_, R> {
    /// Reads more; `false` at the end of the stream. A TCP close without TLS close_notify
    /// counts as the end: what arrived is checked (length, hash) anyway.
    fn fill(&mut self) -> Result<bool, K3sError> {
        let mut chunk = [0u8; 8192];
        loop {
            match self.reader.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    if self.buf.len() - self.pos + n > self.limit + MAX_HEAD {
                        return Err(self.too_large());
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(source) => {
                    return Err(K3sError::Receive {
                        url: self.url.to_owned(),
                        source,
                    })
                }
            }
        }
    }

    fn need(&mut self, n: usize) -> Result<(), K3sError> {
        while self.buf.len() - self.pos < n {
            if !self.fill()? {
                return Err(self.malformed("the body ends early"));
            }
        }
        Ok(())
    }

    fn malformed(&self, reason: &str) -> K3sError {
        K3sError::BadResponse {
            url: self.url.to_owned(),
            reason: reason.to_owned(),
        }
    }

    fn too_large(&self) -> K3sError {
        K3sError::TooLarge {
            url: self.url.to_owned(),
            limit: self.limit,
        }
    }
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// The body of a 2xx answer, and whether the connection can carry another request: the
/// body's length was given, the server did not say `Connection: close`, and nothing came
/// after the body. A chunked answer is read whole but its connection is not used again
/// (its trailers are not read to their end); K3s's `/cacerts` is small enough for Go to
/// send its length.
fn read_response<R: Read>(
    reader: &mut R,
    url: &str,
    limit: usize,
) -> Result<(Vec<u8>, bool), K3sError> {
    let mut inc = Incoming {
        reader,
        buf: Vec::new(),
        pos: 0,
        url,
        limit,
    };
    let (status, framing, closing) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&inc.buf) {
            Ok(httparse::Status::Complete(len)) => {
                let framing = framing(resp.headers).map_err(|r| inc.malformed(r))?;
                let closing = header(resp.headers, "connection")
                    .is_some_and(|v| v.split(',').any(|t| t.trim() == "close"));
                inc.pos = len;
                break (resp.code.unwrap_or_default(), framing, closing);
            }
            Ok(httparse::Status::Partial) if inc.buf.len() > MAX_HEAD => {
                return Err(inc.malformed("the response head is too large"))
            }
            Ok(httparse::Status::Partial) => {
                if !inc.fill()? {
                    return Err(inc.malformed("the connection closed before the response head"));
                }
            }
            Err(e) => return Err(inc.malformed(&e.to_string())),
        }
    };
    if !(200..=299).contains(&status) {
        return Err(K3sError::Status {
            url: url.to_owned(),
            status,
        });
    }
    match framing {
        Framing::Length(n) if n > limit => Err(inc.too_large()),
        Framing::Length(n) => {
            inc.need(n)?;
            let reusable = !closing && inc.buf.len() == inc.pos + n;
            Ok((inc.buf[inc.pos..inc.pos + n].to_vec(), reusable))
        }
        Framing::Chunked => Ok((read_chunked(&mut inc)?, false)),
        Framing::UntilClose => {
            while inc.fill()? {}
            let body = inc.buf.split_off(inc.pos);
            if body.len() > limit {
                return Err(inc.too_large());
            }
            Ok((body, false))
        }
    }
}

/// The value of header `name`, trimmed and in lower case.
fn header(headers: &[httparse::Header<'_>], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
}

fn framing(headers: &[httparse::Header<'_>]) -> Result<Framing, &'static str> {
    let value = |name: &str| header(headers, name);
    if let Some(te) = value("transfer-encoding") {
        return if te == "chunked" {
            Ok(Framing::Chunked)
        } else {
            Err("unsupported transfer encoding")
        };
    }
    match value("content-length") {
        Some(n) => n
            .parse()
            .map(Framing::Length)
            .map_err(|_| "bad content length"),
        None => Ok(Framing::UntilClose),
    }
}

fn read_chunked<R: Read>(inc: &mut Incoming<'_, R>) -> Result<Vec<u8>, K3sError> {
    let mut body = Vec::new();
    loop {
        let (used, size) = loop {
            match httparse::parse_chunk_size(&inc.buf[inc.pos..]) {
                Ok(httparse::Status::Complete(found)) => break found,
                Ok(httparse::Status::Partial) => {
                    if !inc.fill()? {
                        return Err(inc.malformed("the body ends early"));
                    }
                }
                Err(_) => return Err(inc.malformed("bad chunk size")),
            }
        };
        inc.pos += used;
        if size == 0 {
            // Trailers, if any, are of no interest.
            return Ok(body);
        }
        let size = usize::try_from(size).map_err(|_| inc.too_large())?;
        if body.len().saturating_add(size) > inc.limit {
            return Err(inc.too_large());
        }
        inc.need(size + 2)?;
        body.extend_from_slice(&inc.buf[inc.pos..inc.pos + size]);
        if &inc.buf[inc.pos + size..inc.pos + size + 2] != b"\r\n" {
            return Err(inc.malformed("chunk without CRLF"));
        }
        inc.pos += size + 2;
        // Drop consumed bytes so a long stream of small chunks cannot grow the buffer.
        inc.buf.drain(..inc.pos);
        inc.pos = 0;
    }
}

/// Accepts any server certificate, as Go's `InsecureSkipVerify` does for K3s's first
/// `/cacerts` request; the handshake signatures are still checked, so the peer holds the
/// key of the certificate it showed.
#[derive(Debug)]
pub(super) struct AcceptAnyCertificate(pub Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
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

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        let ok = |s: &str| {
            let srv = Server::parse(s).unwrap();
            let url = srv.url("/cacerts");
            (srv.host, srv.port, url)
        };
        assert_eq!(
            ok("https://10.0.2.2:6443"),
            (
                "10.0.2.2".into(),
                6443,
                "https://10.0.2.2:6443/cacerts".into()
            )
        );
        assert_eq!(
            ok("https://k3s.example:6443/some/path/"),
            (
                "k3s.example".into(),
                6443,
                "https://k3s.example:6443/cacerts".into()
            )
        );
        assert_eq!(
            ok("https://k3s.example"),
            (
                "k3s.example".into(),
                443,
                "https://k3s.example/cacerts".into()
            )
        );
        assert_eq!(
            ok("https://[fd00::1]:6443"),
            (
                "fd00::1".into(),
                6443,
                "https://[fd00::1]:6443/cacerts".into()
            )
        );
        for bad in [
            "http://10.0.2.2:6443",
            "10.0.2.2:6443",
            "https://",
            "https://:6443",
            "https://host:port",
            "https://host:70000",
            "https://[fd00::1:6443",
            "https://user:pw@host:6443",
        ] {
            assert!(
                matches!(Server::parse(bad), Err(K3sError::BadUrl { .. })),
                "{bad}"
            );
        }
    }

    fn parse(raw: &[u8], limit: usize) -> Result<Vec<u8>, K3sError> {
        parse_keeping(raw, limit).map(|(body, _)| body)
    }

    fn parse_keeping(raw: &[u8], limit: usize) -> Result<(Vec<u8>, bool), K3sError> {
        read_response(
            &mut io::Cursor::new(raw.to_vec()),
            "https://t/cacerts",
            limit,
        )
    }

    #[test]
    fn only_an_answer_of_known_length_that_ends_the_data_leaves_the_connection_usable() {
        let reusable = |raw: &[u8]| parse_keeping(raw, 1024).unwrap().1;
        assert!(reusable(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"));
        assert!(reusable(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc"
        ));
        for raw in [
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: Close\r\n\r\nabc".as_slice(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nconnection: upgrade, close\r\n\r\nabc",
            // Something after the body: not an answer this client can line up.
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\nabc",
        ] {
            let (body, reusable) = parse_keeping(raw, 1024).unwrap();
            assert_eq!(body, b"abc");
            assert!(!reusable, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn response_framing() {
        let body = b"-----BEGIN CERTIFICATE-----\n".to_vec();
        let cl = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 28\r\n\r\n".as_slice(),
            &body,
            b"ignored",
        ]
        .concat();
        assert_eq!(parse(&cl, 1024).unwrap(), body);
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n5\r\n-----\r\n17;x=y\r\nBEGIN CERTIFICATE-----\n\r\n0\r\nTrailer: t\r\n\r\n";
        assert_eq!(parse(chunked, 1024).unwrap(), body);
        let eof = [b"HTTP/1.1 200 OK\r\n\r\n".as_slice(), &body].concat();
        assert_eq!(parse(&eof, 1024).unwrap(), body);
    }

    #[test]
    fn response_refusals() {
        let cases: [(&[u8], usize, &str); 8] = [
            (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 64, "status 404"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 65\r\n\r\n", 64, "too large"),
            (b"HTTP/1.1 200 OK\r\n\r\n0123456789", 4, "too large"),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\n0123456789\r\n0\r\n\r\n", 4, "too large"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", 64, "ends early"),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc", 64, "ends early"),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", 64, "transfer encoding"),
            (b"SSH-2.0-OpenSSH\r\n\r\n", 64, "malformed"),
        ];
        for (raw, limit, what) in cases {
            let err = parse(raw, limit).unwrap_err();
            let ok = match what {
                "status 404" => matches!(err, K3sError::Status { status: 404, .. }),
                "too large" => matches!(err, K3sError::TooLarge { .. }),
                "malformed" => matches!(err, K3sError::BadResponse { .. }),
                reason => {
                    matches!(&err, K3sError::BadResponse { reason: r, .. } if r.contains(reason))
                }
            };
            assert!(ok, "{what}: {err:?}");
            assert!(err.to_string().contains("https://t/cacerts"), "{err}");
        }
    }
}
