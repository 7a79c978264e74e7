//! The little HTTP/1.1 the node API speaks: one request per connection, its head parsed
//! by httparse and bounded, a body only with `Content-Length` and bounded, responses
//! with a length (or chunked, for a followed log) and `Connection: close`.

use basalt_api::node::ErrorBody;
use std::io::{self, Read, Write};

/// The request line and headers together.
pub const HEAD_LIMIT: usize = 16 * 1024;
/// A machine config is a few KiB; the config sources cap it at the same size.
pub const BODY_LIMIT: usize = crate::config_source::MAX_BYTES as usize;
/// An upgrade bundle ([`basalt_api::node::path::UPGRADE`]) is streamed, never held: it
/// may be as large as a slot and its boot files.
pub const UPGRADE_BODY_LIMIT: usize = 16 << 30;
const MAX_HEADERS: usize = 64;

/// A query's `name=value` pairs, names and values percent-decoded alike (`url=` is sent
/// encoded: it has `?`, `&`, `=`); `+` stays `+` (the API's clients encode a space as
/// `%20`). A `%` that does not start two hex digits, or bytes that are not UTF-8 once
/// decoded, are refused naming the parameter.
fn parse_query(query: &str) -> Result<Vec<(String, Option<String>)>, HttpError> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (name, value) = match kv.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (kv, None),
            };
            let bad = |why| HttpError::BadParam {
                name: name.to_owned(),
                why,
            };
            let name_decoded = percent_decode(name).map_err(bad)?;
            let value =
                value
                    .map(percent_decode)
                    .transpose()
                    .map_err(|why| HttpError::BadParam {
                        name: name_decoded.clone(),
                        why,
                    })?;
            Ok((name_decoded, value))
        })
        .collect()
}

/// One query component percent-decoded (by the `percent-encoding` crate, which passes a
/// malformed escape through as it is: refused here first).
fn percent_decode(s: &str) -> Result<String, &'static str> {
    let b = s.as_bytes();
    let hex = |i: usize| b.get(i).is_some_and(u8::is_ascii_hexdigit);
    if (0..b.len()).any(|i| b[i] == b'%' && !(hex(i + 1) && hex(i + 2))) {
        return Err("a malformed percent escape (% must start two hex digits)");
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|d| d.into_owned())
        .map_err(|_| "not UTF-8 once percent-decoded")
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The query's `name=value` pairs in order, both sides percent-decoded
    /// ([`parse_query`]); a bare `name` has no value.
    pub params: Vec<(String, Option<String>)>,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The (percent-decoded) value of the first `name=value` in the query.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find_map(|(n, v)| if n == name { v.as_deref() } else { None })
    }

    /// Whether the query has `name=1`, `name=true`, `name=yes` or a bare `name`.
    pub fn flag(&self, name: &str) -> bool {
        self.params
            .iter()
            .any(|(n, v)| n == name && matches!(v.as_deref(), None | Some("1" | "true" | "yes")))
    }
}

/// Why no request could be read; each but `Io` and `Closed` is answered.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("query parameter {name:?}: {why}")]
    BadParam { name: String, why: &'static str },
    #[error("request head larger than {HEAD_LIMIT} bytes")]
    HeadTooLarge,
    #[error("request body larger than {BODY_LIMIT} bytes")]
    BodyTooLarge,
    #[error("a request body needs Content-Length (chunked bodies are not accepted)")]
    LengthRequired,
    #[error("the client closed the connection")]
    Closed,
    #[error("read the request")]
    Io(#[source] io::Error),
}

impl HttpError {
    /// The response that says so, if the client is still there to read one.
    pub fn response(&self) -> Option<Response> {
        let status = match self {
            HttpError::Malformed(_) | HttpError::BadParam { .. } => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::LengthRequired => 411,
            HttpError::Closed | HttpError::Io(_) => return None,
        };
        Some(Response::error(status, &self.to_string()))
    }
}

/// A request whose head has been read: its [`Request`] without the body yet.
#[derive(Debug)]
pub struct Head {
    pub request: Request,
    /// `Content-Length` (0 without one); at most [`BODY_LIMIT`].
    pub length: usize,
    /// What of the body came with the head.
    early: Vec<u8>,
}

/// Reads one request, answering `100 Continue` when the client waits for it.
pub fn read_request<S: Read + Write>(stream: &mut S) -> Result<Request, HttpError> {
    let head = read_head(stream)?;
    read_body(stream, head)
}

/// Reads and checks a request head (its size, `Content-Length`), not reading further
/// than the bytes that came with it: whether to read the body is decided on the head.
pub fn read_head<S: Read>(stream: &mut S) -> Result<Head, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (request, head_len) = loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(HttpError::Closed),
            Ok(0) => return Err(HttpError::Malformed("the request ended in its head".into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HttpError::Io(e)),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(parsed) = parse_head(&buf)? {
            break parsed;
        }
        if buf.len() > HEAD_LIMIT {
            return Err(HttpError::HeadTooLarge);
        }
    };
    if head_len > HEAD_LIMIT {
        return Err(HttpError::HeadTooLarge);
    }
    if request.header("transfer-encoding").is_some() {
        return Err(HttpError::LengthRequired);
    }
    let length = match request.header("content-length") {
        None => 0,
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map_err(|_| HttpError::Malformed(format!("Content-Length {v:?}")))?,
    };
    let limit = if request.path == basalt_api::node::path::UPGRADE {
        UPGRADE_BODY_LIMIT
    } else {
        BODY_LIMIT
    };
    if length > limit {
        return Err(HttpError::BodyTooLarge);
    }
    let early = buf.split_off(head_len);
    if early.len() > length {
        return Err(HttpError::Malformed(
            "more bytes than Content-Length (one request per connection)".into(),
        ));
    }
    Ok(Head {
        request,
        length,
        early,
    })
}

/// Reads the body of `head`'s request, first answering `100 Continue` when the client
/// waits for it.
pub fn read_body<S: Read + Write>(stream: &mut S, head: Head) -> Result<Request, HttpError> {
    let Head {
        mut request,
        length,
        early: mut body,
    } = head;
    answer_continue(stream, &request, length > body.len())?;
    let have = body.len();
    body.resize(length, 0);
    read_exact(stream, &mut body[have..])?;
    request.body = body;
    Ok(request)
}

/// Answers `100 Continue` when the client waits for it and part of the body is still
/// to come (`more`).
fn answer_continue<S: Write>(
    stream: &mut S,
    request: &Request,
    more: bool,
) -> Result<(), HttpError> {
    if more
        && request
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .and_then(|()| stream.flush())
            .map_err(HttpError::Io)?;
    }
    Ok(())
}

/// A request body read as it arrives: what came with the head, then the stream.
pub type Body<'a, S> = io::Chain<io::Cursor<Vec<u8>>, io::Take<&'a mut S>>;

/// The body of `head`'s request as a reader (what came with the head, then the rest from
/// the stream, `Content-Length` bytes in all), first answering `100 Continue` when the
/// client waits for it: for a body streamed, not held.
pub fn body_reader<S: Read + Write>(
    stream: &mut S,
    head: Head,
) -> Result<(Request, Body<'_, S>), HttpError> {
    let Head {
        request,
        length,
        early,
    } = head;
    answer_continue(stream, &request, length > early.len())?;
    let rest = (length - early.len()) as u64;
    Ok((request, io::Cursor::new(early).chain(stream.take(rest))))
}

fn read_exact(stream: &mut impl Read, mut out: &mut [u8]) -> Result<(), HttpError> {
    while !out.is_empty() {
        match stream.read(out) {
            Ok(0) => {
                return Err(HttpError::Malformed(
                    "the body is shorter than Content-Length".into(),
                ))
            }
            Ok(n) => out = &mut out[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HttpError::Io(e)),
        }
    }
    Ok(())
}

/// The request and the length of its head, once the head is complete.
fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(HttpError::Malformed("no request line".into()));
    };
    if req.version != Some(1) {
        return Err(HttpError::Malformed("HTTP/1.1 only".into()));
    }
    let (path, params) = match target.split_once('?') {
        Some((p, q)) => (p, parse_query(q)?),
        None => (target, Vec::new()),
    };
    let headers = req
        .headers
        .iter()
        .map(|h| {
            let value = std::str::from_utf8(h.value)
                .map_err(|_| HttpError::Malformed(format!("header {} is not UTF-8", h.name)))?;
            Ok((h.name.to_ascii_lowercase(), value.to_owned()))
        })
        .collect::<Result<Vec<_>, HttpError>>()?;
    Ok(Some((
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            params,
            headers,
            body: Vec::new(),
        },
        len,
    )))
}

/// A whole response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

pub const JSON: &str = "application/json";
pub const TEXT: &str = "text/plain; charset=utf-8";
/// Prometheus's text exposition format.
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Response {
    pub fn json(status: u16, body: &impl serde::Serialize) -> Response {
        match serde_json::to_vec(body) {
            Ok(mut b) => {
                b.push(b'\n');
                Response {
                    status,
                    content_type: JSON,
                    body: b,
                }
            }
            Err(e) => Response::error(500, &format!("encode the response: {e}")),
        }
    }

    /// Every error is an [`ErrorBody`].
    pub fn error(status: u16, message: &str) -> Response {
        let body = ErrorBody {
            error: message.to_owned(),
        };
        let mut b = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        b.push(b'\n');
        Response {
            status,
            content_type: JSON,
            body: b,
        }
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            body: body.into_bytes(),
        }
    }

    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        w.write_all(head.as_bytes())?;
        w.write_all(&self.body)?;
        w.flush()
    }
}

/// The head of a chunked response; then [`write_chunk`]s and [`end_chunks`].
pub fn write_chunked_head(w: &mut impl Write, content_type: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    );
    w.write_all(head.as_bytes())?;
    w.flush()
}

pub fn write_chunk(w: &mut impl Write, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        // An empty chunk would end the body.
        return Ok(());
    }
    write!(w, "{:x}\r\n", data.len())?;
    w.write_all(data)?;
    w.write_all(b"\r\n")?;
    w.flush()
}

pub fn end_chunks(w: &mut impl Write) -> io::Result<()> {
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out its bytes in pieces of `step`, as a socket may, and keeps what is
    /// written to it.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        sent: Vec<u8>,
    }

    impl Write for Trickle<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn read(data: &[u8]) -> (Result<Request, HttpError>, Vec<u8>) {
        let mut t = Trickle {
            data,
            step: 7,
            sent: Vec::new(),
        };
        let got = read_request(&mut t);
        (got, t.sent)
    }

    #[test]
    fn a_request_in_pieces_is_parsed_with_its_body_and_query() {
        let raw = b"POST /v1/config?x=1&follow HTTP/1.1\r\nHost: n\r\nContent-Type: application/toml\r\nContent-Length: 11\r\n\r\nversion = 1";
        let (got, sent) = read(raw);
        let req = got.expect("request");
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/v1/config");
        assert_eq!(req.header("content-type"), Some("application/toml"));
        assert_eq!(req.body, b"version = 1");
        assert!(req.flag("follow") && !req.flag("x2"));
        assert!(sent.is_empty());
    }

    #[test]
    fn query_parameters_are_percent_decoded_and_a_malformed_one_is_refused_by_name() {
        let raw = b"POST /v1/upgrade?url=https%3A%2F%2Fh%2Fb%3Fa%3D1%26b%3D2&sha256=ab%63d&reboot&allow%5Fdowngrade=1&p=a+b%20c&e= HTTP/1.1\r\nHost: n\r\n\r\n";
        let req = read(raw).0.expect("request");
        assert_eq!(req.param("url"), Some("https://h/b?a=1&b=2"));
        assert_eq!(req.param("sha256"), Some("abcd"));
        assert_eq!(req.param("p"), Some("a+b c"));
        assert_eq!(req.param("e"), Some(""));
        assert_eq!(req.param("reboot"), None);
        assert!(req.flag("reboot") && req.flag("allow_downgrade"));
        assert!(!req.flag("e") && !req.flag("p") && !req.flag("allow"));
        for (query, name, why) in [
            ("sha256=ab%zz", "sha256", "malformed percent escape"),
            ("reboot=1&follow=%", "follow", "malformed percent escape"),
            ("url=http%3A%2", "url", "malformed percent escape"),
            ("url=%ff", "url", "not UTF-8"),
            ("sha%5=1", "sha%5", "malformed percent escape"),
            ("%C3%A9=%", "\u{e9}", "malformed percent escape"),
        ] {
            let raw = format!("GET /v1/status?{query} HTTP/1.1\r\nHost: n\r\n\r\n");
            let err = read(raw.as_bytes()).0.expect_err(query);
            let resp = err.response().expect("answered");
            assert_eq!(resp.status, 400, "{query}");
            let text = err.to_string();
            assert!(String::from_utf8_lossy(&resp.body).contains(why), "{query}");
            assert!(
                text.contains(&format!("query parameter \"{name}\"")) && text.contains(why),
                "{query}: {text}"
            );
        }
    }

    #[test]
    fn limits_and_malformed_requests_get_their_status() {
        let big = format!(
            "POST /v1/config HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            BODY_LIMIT + 1
        );
        let long_header = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(HEAD_LIMIT));
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        let cases: [(&[u8], Option<u16>); 9] = [
            (big.as_bytes(), Some(413)),
            (long_header.as_bytes(), Some(431)),
            (many.as_bytes(), Some(431)),
            (b"GET\r\n\r\n", Some(400)),
            (b"GET / HTTP/1.0\r\n\r\n", Some(400)),
            (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", Some(400)),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                Some(411),
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", Some(400)),
            (b"", None),
        ];
        for (raw, want) in cases {
            let (got, _) = read(raw);
            let err = got.expect_err("refused");
            assert_eq!(
                err.response().map(|r| r.status),
                want,
                "{}: {err}",
                String::from_utf8_lossy(&raw[..raw.len().min(40)])
            );
            if let Some(r) = err.response() {
                let body: ErrorBody = serde_json::from_slice(&r.body).expect("ErrorBody");
                assert!(!body.error.is_empty());
            }
        }
    }

    #[test]
    fn a_head_is_read_without_its_body() {
        let raw =
            b"POST /v1/config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nabcde";
        let mut t = Trickle {
            data: raw,
            step: raw.len() - 5,
            sent: Vec::new(),
        };
        let head = read_head(&mut t).expect("head");
        assert_eq!((head.request.path.as_str(), head.length), ("/v1/config", 5));
        assert_eq!(t.data, b"abcde", "no body byte read");
        assert!(
            t.sent.is_empty(),
            "no 100 Continue before the body is wanted"
        );
        let req = read_body(&mut t, head).expect("body");
        assert_eq!(req.body, b"abcde");
        assert_eq!(t.sent, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn a_client_that_expects_100_continue_gets_it() {
        let raw =
            b"POST /v1/config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc";
        // The body arrives in the read after the head.
        let mut t = Trickle {
            data: raw,
            step: raw.len() - 3,
            sent: Vec::new(),
        };
        let req = read_request(&mut t).expect("request");
        assert_eq!(req.body, b"abc");
        assert_eq!(t.sent, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn responses_carry_length_and_close() {
        let mut out = Vec::new();
        Response::error(404, "no such endpoint")
            .write_to(&mut out)
            .expect("write");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).expect("body");
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert_eq!(body, "{\"error\":\"no such endpoint\"}\n");

        let mut out = Vec::new();
        write_chunked_head(&mut out, TEXT).expect("head");
        write_chunk(&mut out, b"hello\n").expect("chunk");
        write_chunk(&mut out, b"").expect("nothing");
        end_chunks(&mut out).expect("end");
        let text = String::from_utf8(out).expect("utf8");
        assert!(
            text.ends_with("\r\n\r\n6\r\nhello\n\r\n0\r\n\r\n"),
            "{text:?}"
        );
    }
}
