//! The URL form of `POST /v1/upgrade` (`?url=...&sha256=...`): the node fetches the
//! bundle itself, and what arrives goes through exactly the same path as a streamed body
//! ([`super::install::install`]): the reader returned here stands in for the request's
//! body, hashed and checked as it is read, so nothing is switched unless the whole bundle
//! hashes to the `sha256` the request carried.
//!
//! That sha256 is the integrity check, so both `http://` and `https://` are accepted:
//! HTTPS is verified against the Mozilla roots (webpki-roots, built in: the node has no
//! CA bundle of its own) and buys confidentiality, not integrity. The server must answer
//! 200 with a `Content-Length` (any static file server does): the length is what tells a
//! complete bundle from a truncated one. Redirects are followed (at most
//! [`MAX_REDIRECTS`]); no proxy is used. A server that sends nothing for
//! [`READ_TIMEOUT`] is given up. Logs and errors show the URL without its query
//! ([`shown`]).

use std::io::{self, Read};
use std::time::Duration;

/// Connecting (DNS included) may take this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The response head, and then each read of the body, may take this long.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
pub const MAX_REDIRECTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("url {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("fetch {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: ureq::Error,
    },
    #[error("fetch {url}: the server answered HTTP {status}, not 200")]
    Status { url: String, status: u16 },
    #[error(
        "fetch {url}: the server sent no Content-Length (needed to tell a whole bundle \
         from a truncated one)"
    )]
    NoLength { url: String },
}

impl FetchError {
    /// The node API's answer: 400 for a URL that is not one, 502 for a server that could
    /// not be reached or did not give the bundle.
    pub fn status(&self) -> u16 {
        match self {
            FetchError::BadUrl { .. } => 400,
            _ => 502,
        }
    }
}

/// The URL as logs and errors show it: without its query, which may carry a credential
/// (a presigned URL's signature).
pub fn shown(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    }
}

/// The response body being read, and its announced length.
pub struct Fetched {
    pub body: Box<dyn Read + Send>,
    pub length: u64,
}

/// Checks the URL's form: `http://` or `https://`, a host, no credentials in it (they
/// would end up in the node's log).
pub fn check_url(url: &str) -> Result<(), FetchError> {
    let bad = |reason| FetchError::BadUrl {
        url: shown(url),
        reason,
    };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or(bad("only http:// and https:// are fetched"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(bad("it has no host"));
    }
    if authority.contains('@') {
        return Err(FetchError::BadUrl {
            url: "(not repeated: it holds credentials)".into(),
            reason: "credentials in the URL are refused (they would be logged)",
        });
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it contains whitespace or control characters"));
    }
    Ok(())
}

/// GETs `url`; the body is left to be read.
pub fn open(url: &str) -> Result<Fetched, FetchError> {
    check_url(url)?;
    let agent = ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .max_redirects(MAX_REDIRECTS)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(READ_TIMEOUT))
        .timeout_per_read(Some(READ_TIMEOUT))
        .user_agent("basalt-init")
        .build()
        .new_agent();
    let resp = agent
        .get(url)
        .header("Accept-Encoding", "identity")
        .call()
        .map_err(|source| FetchError::Unreachable {
            url: shown(url),
            source,
        })?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(FetchError::Status {
            url: shown(url),
            status,
        });
    }
    let length = resp
        .body()
        .content_length()
        .ok_or_else(|| FetchError::NoLength { url: shown(url) })?;
    Ok(Fetched {
        body: Box::new(Counted {
            inner: resp.into_body().into_reader(),
            got: 0,
            length,
            url: shown(url),
        }),
        length,
    })
}

/// The body, with a connection that breaks before `length` bytes shown as what it is to
/// the installer: an unexpected end (a truncated bundle), whatever error the transport
/// reported.
struct Counted<R> {
    inner: R,
    got: u64,
    length: u64,
    url: String,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.got += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) if self.got < self.length => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: the body broke off after {} of {} bytes: {e}",
                    self.url, self.got, self.length
                ),
            )),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_with_a_host_and_no_credentials_are_fetched() {
        assert!(check_url("http://10.0.2.2:8000/v2.bundle.tar").is_ok());
        assert!(check_url("https://example.com/a/b.tar?x=1").is_ok());
        for (url, why) in [
            ("ftp://example.com/b.tar", "only http"),
            ("file:///tmp/b.tar", "only http"),
            ("http:///b.tar", "no host"),
            ("https://user:pw@example.com/b.tar", "credentials"),
            ("http://example.com/a b.tar", "whitespace"),
        ] {
            let err = check_url(url).unwrap_err();
            assert!(err.to_string().contains(why), "{url}: {err}");
            assert_eq!(err.status(), 400);
        }
        // A presigned URL's query is a credential: never shown.
        let err = check_url("gopher://h/b?X-Amz-Signature=secret").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert_eq!(shown("https://h/b.tar?sig=secret"), "https://h/b.tar?…");
        assert_eq!(shown("https://h/b.tar"), "https://h/b.tar");
    }
}
