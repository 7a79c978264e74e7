//! The listener and the connections: TLS handshake, one request, the answer, a clean
//! close. A refused handshake still gets its alert to the client (flushed, then our
//! side shut, then what the client still sends drained briefly), so the client can say
//! why instead of seeing a reset.

use super::http::{self, HttpError, TEXT};
use super::routes::{self, Reply};
use super::{tls, Context, MAX_CONNECTIONS};
use crate::pid1::console;
use crate::pid1::mailbox::Power;
use rustls::ServerConnection;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Each read and write of a handshake or request.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// A closing connection is drained of what the client still sends (a body over the
/// limit, over a slow link) until it has been quiet this long...
const LINGER_IDLE: Duration = Duration::from_secs(2);
/// ...or for this long at most...
const LINGER_MAX: Duration = Duration::from_secs(60);
/// ...or this many bytes.
const DRAIN_MAX: usize = 64 * 1024 * 1024;
/// How often a followed log is polled.
const FOLLOW_POLL: Duration = Duration::from_millis(300);

/// Starts the API on `listen` in a thread of its own. Binding is retried (an address
/// that is not there yet, a port still taken) for as long as it fails.
pub fn start(ctx: Arc<Context>, listen: SocketAddr) -> io::Result<()> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || serve(ctx, bind(listen)))
        .map(drop)
}

fn bind(listen: SocketAddr) -> TcpListener {
    let mut reported = false;
    loop {
        match TcpListener::bind(listen) {
            Ok(l) => {
                console::info(&format!("api: listening on https://{listen}"));
                return l;
            }
            Err(e) => {
                if !reported {
                    console::error(&format!("api: listen on {listen} (retrying)"), &e);
                    reported = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Accepts connections for ever, each served in a thread of its own.
pub fn serve(ctx: Arc<Context>, listener: TcpListener) {
    loop {
        match listener.accept() {
            Ok((tcp, peer)) => dispatch(&ctx, tcp, peer),
            // EMFILE and the like: do not spin.
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// One of [`MAX_CONNECTIONS`]; given back when dropped.
struct Slot(Arc<Context>);

impl Slot {
    fn take(ctx: &Arc<Context>) -> Option<Slot> {
        if ctx.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            ctx.active.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot(Arc::clone(ctx)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn dispatch(ctx: &Arc<Context>, tcp: TcpStream, peer: SocketAddr) {
    let Some(slot) = Slot::take(ctx) else {
        ctx.metrics.over_capacity.fetch_add(1, Ordering::Relaxed);
        ctx.refused(&format!(
            "connection from {peer}: {MAX_CONNECTIONS} already open"
        ));
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("api-conn".into())
        .spawn(move || {
            let slot = slot;
            connection(&slot.0, tcp, peer);
        });
    if let Err(e) = spawned {
        console::error("api: start a connection thread", &e);
    }
}

/// Serves one connection to its end.
pub fn connection(ctx: &Context, mut tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_read_timeout(Some(IO_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(IO_TIMEOUT));
    let _ = tcp.set_nodelay(true);
    let Ok(mut conn) = ServerConnection::new(ctx.tls()) else {
        return;
    };
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            ctx.metrics
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            ctx.refused(&format!("TLS from {peer}: {}", tls::describe(&e)));
            // complete_io wrote what it could of the alert; the rest, then close.
            while conn.wants_write() && conn.write_tls(&mut tcp).is_ok() {}
            linger(&mut tcp);
            return;
        }
    }
    let client = super::guard::Client::from_peer(conn.peer_certificates());
    let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
    let (reply, what) = match http::read_request(&mut stream) {
        Ok(req) => {
            let what = format!("{} {}", req.method, req.path);
            (routes::route(ctx, &req, &client, Instant::now()), what)
        }
        Err(HttpError::Closed) | Err(HttpError::Io(_)) => return close(&mut conn, &mut tcp),
        Err(e) => match e.response() {
            Some(resp) => (Reply::Done(resp), e.to_string()),
            None => return close(&mut conn, &mut tcp),
        },
    };
    let (resp, then) = match reply {
        Reply::Done(resp) => (resp, None),
        Reply::ThenPower(resp, power) => (resp, Some(power)),
        Reply::Follow(service) => {
            ctx.metrics.count(200);
            follow(ctx, &mut stream, &service);
            return close(&mut conn, &mut tcp);
        }
    };
    ctx.metrics.count(resp.status);
    if resp.status >= 400 {
        ctx.refused(&format!("{what} from {peer}: {}", resp.status));
    }
    let _ = resp.write_to(&mut stream);
    close(&mut conn, &mut tcp);
    if let Some(power) = then {
        request_power(ctx, power);
    }
}

fn request_power(ctx: &Context, power: Power) {
    console::info(&format!("api: {power:?} requested"));
    if let Err(e) = ctx.control.power(power) {
        console::error("api: power request", &e);
    }
}

/// Streams the service's log: what is kept, then each new line, until the client goes.
fn follow(
    ctx: &Context,
    stream: &mut rustls::Stream<'_, ServerConnection, TcpStream>,
    service: &str,
) {
    let _ = stream.sock.set_read_timeout(Some(FOLLOW_POLL));
    if http::write_chunked_head(stream, TEXT).is_err() {
        return;
    }
    let mut from = None;
    loop {
        match ctx.control.logs(service, from) {
            Ok(Some(chunk)) => {
                let mut text = String::new();
                for line in &chunk.lines {
                    text.push_str(line);
                    text.push('\n');
                }
                if http::write_chunk(stream, text.as_bytes()).is_err() {
                    return;
                }
                from = Some(chunk.next);
            }
            Ok(None) | Err(_) => {
                let _ = http::end_chunks(stream);
                return;
            }
        }
        // The wait between polls, which also notices a client that left.
        let mut buf = [0u8; 512];
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// close_notify, then [`linger`].
fn close(conn: &mut ServerConnection, tcp: &mut TcpStream) {
    conn.send_close_notify();
    while conn.wants_write() && conn.write_tls(tcp).is_ok() {}
    linger(tcp);
}

/// Shuts our side, then reads what the client still sends until it closes (bounded),
/// so that closing does not reset the connection under data it has not read yet.
fn linger(tcp: &mut TcpStream) {
    let _ = tcp.shutdown(Shutdown::Write);
    if tcp.set_read_timeout(Some(LINGER_IDLE)).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_MAX;
    let mut drained = 0usize;
    let mut buf = [0u8; 16 * 1024];
    while drained < DRAIN_MAX && Instant::now() < deadline {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

#[cfg(test)]
mod tests;
