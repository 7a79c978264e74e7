//! The listener and the connections: admission ([`super::slots`]), TLS handshake, one
//! request (its head authorized before any body is read), the answer, a clean close.
//! Each phase has a deadline ([`super::Limits`]), not only each read. A refused handshake
//! still gets its alert to the client (flushed, then our side shut, then what the client
//! still sends drained for [`super::LINGER`] at most), so the client can say why instead
//! of seeing a reset.

use super::http::{self, HttpError, Request, Response, TEXT};
use super::routes::{self, Reply};
use super::slots::Admission;
use super::{tls, Context};
use crate::pid1::console;
use crate::pid1::mailbox::Power;
use rustls::ServerConnection;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Each read and write at most, whatever the phase's deadline.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Writing the answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// A closing connection is drained of at most this many bytes.
const DRAIN_MAX: usize = 64 * 1024 * 1024;
/// How often a followed log is polled.
const FOLLOW_POLL: Duration = Duration::from_millis(300);
/// A client following a log has nothing to say: after this many bytes from it, the
/// follow ends (what it sends is read and dropped until then, poll by poll).
const FOLLOW_DISCARD_MAX: usize = 16 * 1024;

/// Starts the API on `listen` in a thread of its own. Binding is retried (an address
/// that is not there yet, a port still taken) for as long as it fails.
pub fn start(ctx: Arc<Context>, listen: SocketAddr) -> io::Result<()> {
    let _ = super::CURRENT.set(Arc::clone(&ctx));
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || serve(ctx, bind(listen)))
        .map(drop)
}

/// Set once the API's listener is bound.
static LISTENING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the node API listens (a trial's first health condition).
pub fn listening() -> bool {
    LISTENING.load(Ordering::Relaxed)
}

fn bind(listen: SocketAddr) -> TcpListener {
    let mut reported = false;
    loop {
        match TcpListener::bind(listen) {
            Ok(l) => {
                console::info(&format!("api: listening on https://{listen}"));
                LISTENING.store(true, Ordering::Relaxed);
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

fn dispatch(ctx: &Arc<Context>, tcp: TcpStream, peer: SocketAddr) {
    let admission = match ctx.slots.admit(peer.ip(), &tcp) {
        Ok((admission, made_room)) => {
            if made_room {
                ctx.metrics.over_capacity.fetch_add(1, Ordering::Relaxed);
                ctx.refused(&format!(
                    "an older connection without a certificate: all {} open slots taken, \
                     a new one from {peer}",
                    ctx.limits.open_slots
                ));
            }
            admission
        }
        Err(e) => {
            ctx.metrics.over_capacity.fetch_add(1, Ordering::Relaxed);
            ctx.refused(&format!("connection from {peer}: {e}"));
            // Closed at once: nothing was read, there is nothing to drain.
            return;
        }
    };
    let ctx = Arc::clone(ctx);
    let spawned = std::thread::Builder::new()
        .name("api-conn".into())
        .spawn(move || {
            connection(&ctx, tcp, peer, admission);
            // What the connection freed (TLS records, a join's check) back to the kernel.
            crate::pid1::memory::trim();
        });
    if let Err(e) = spawned {
        console::error("api: start a connection thread", &e);
    }
}

/// The connection's socket under the deadline of the phase it is in: no read or write
/// waits past it (nor longer than [`IO_TIMEOUT`]), none starts after it. A client that
/// sends a byte now and then cannot stretch a phase.
struct Timed {
    tcp: TcpStream,
    deadline: Instant,
}

impl Timed {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        Ok(left.min(IO_TIMEOUT))
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.set_read_timeout(Some(self.left()?))?;
        self.tcp.read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.set_write_timeout(Some(self.left()?))?;
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

type Tls<'a> = rustls::Stream<'a, ServerConnection, Timed>;

/// What became of reading a request.
enum Received {
    /// A whole request the client may make, and when its head was in.
    Request(Request, Instant),
    /// Answered without routing (refused, or not HTTP we take).
    Answer(Response, String),
    /// An authorized `POST /v1/upgrade`, its body not read: streamed by the route.
    Upgrade(http::Head),
    /// Nothing to answer: the client went, or missed a deadline.
    Gone,
}

/// Reads the head under its deadline, authorizes it, then reads the body under its own.
fn receive(ctx: &Context, stream: &mut Tls<'_>, client: &super::guard::Client) -> Received {
    let refusal = |e: HttpError| match e.response() {
        Some(resp) => Received::Answer(resp, e.to_string()),
        None => Received::Gone,
    };
    stream.sock.deadline = Instant::now() + ctx.limits.head;
    let head = match http::read_head(stream) {
        Ok(head) => head,
        Err(e) => return refusal(e),
    };
    let received = Instant::now();
    let what = format!("{} {}", head.request.method, head.request.path);
    if let Err(resp) = routes::authorize(ctx, &head.request.method, &head.request.path, client) {
        return Received::Answer(resp, what);
    }
    stream.sock.deadline = received + ctx.limits.body(head.length);
    if head.request.method == "POST" && head.request.path == basalt_api::node::path::UPGRADE {
        return Received::Upgrade(head);
    }
    match http::read_body(stream, head) {
        Ok(req) => Received::Request(req, received),
        Err(e) => refusal(e),
    }
}

/// Serves one connection to its end.
pub fn connection(ctx: &Context, tcp: TcpStream, peer: SocketAddr, mut admission: Admission) {
    let _ = tcp.set_nodelay(true);
    let mut io = Timed {
        tcp,
        deadline: Instant::now() + ctx.limits.handshake,
    };
    let Ok(mut conn) = ServerConnection::new(ctx.tls()) else {
        return;
    };
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut io) {
            ctx.metrics
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            ctx.refused(&format!("TLS from {peer}: {}", tls::describe(&e)));
            // complete_io wrote what it could of the alert; the rest, then close.
            io.deadline = Instant::now() + ctx.limits.linger;
            while conn.wants_write() && conn.write_tls(&mut io).is_ok() {}
            linger(&mut io.tcp, ctx.limits.linger);
            return;
        }
    }
    let client = super::guard::Client::from_peer(conn.peer_certificates());
    if client.facts.is_some() {
        admission.authenticate();
    }
    let mut stream = rustls::Stream::new(&mut conn, &mut io);
    let (reply, what) = match receive(ctx, &mut stream, &client) {
        Received::Request(req, received) => {
            let what = format!("{} {}", req.method, req.path);
            (routes::route(ctx, &req, &client, received), what)
        }
        Received::Answer(resp, what) => (Reply::Done(resp), what),
        Received::Upgrade(head) => {
            let what = format!("{} {}", head.request.method, head.request.path);
            (super::upgrade::receive(ctx, head, &mut stream), what)
        }
        Received::Gone => return close(ctx, &mut conn, &mut io),
    };
    stream.sock.deadline = Instant::now() + ANSWER_TIMEOUT;
    let (resp, then) = match reply {
        Reply::Done(resp) => (resp, None),
        Reply::ThenPower(resp, power) => (resp, Some(power)),
        Reply::Follow(service) => {
            ctx.metrics.count(200);
            follow(ctx, &mut stream, &service);
            return close(ctx, &mut conn, &mut io);
        }
    };
    ctx.metrics.count(resp.status);
    if resp.status >= 400 {
        ctx.refused(&format!("{what} from {peer}: {}", resp.status));
    }
    let _ = resp.write_to(&mut stream);
    close(ctx, &mut conn, &mut io);
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

/// Streams the service's log: what is kept, then each new line, until the client goes
/// (or says more than [`FOLLOW_DISCARD_MAX`] bytes, which a follower has no reason to).
fn follow(ctx: &Context, stream: &mut Tls<'_>, service: &str) {
    if http::write_chunked_head(stream, TEXT).is_err() {
        return;
    }
    let mut from = None;
    let mut discarded = 0usize;
    loop {
        stream.sock.deadline = Instant::now() + ANSWER_TIMEOUT;
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
        // The wait until the next poll, which also notices a client that left. What the
        // client sends meanwhile is dropped; it does not shorten the wait.
        stream.sock.deadline = Instant::now() + FOLLOW_POLL;
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    discarded += n;
                    if discarded > FOLLOW_DISCARD_MAX {
                        stream.sock.deadline = Instant::now() + ANSWER_TIMEOUT;
                        let _ = http::end_chunks(stream);
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(_) => return,
            }
        }
    }
}

/// close_notify, then [`linger`].
fn close(ctx: &Context, conn: &mut ServerConnection, io: &mut Timed) {
    conn.send_close_notify();
    io.deadline = Instant::now() + ctx.limits.linger;
    while conn.wants_write() && conn.write_tls(io).is_ok() {}
    linger(&mut io.tcp, ctx.limits.linger);
}

/// Shuts our side, then reads what the client still sends until it closes, for at most
/// `max` (and [`DRAIN_MAX`] bytes), so that closing does not reset the connection under
/// data it has not read yet.
fn linger(tcp: &mut TcpStream, max: Duration) {
    let _ = tcp.shutdown(Shutdown::Write);
    let deadline = Instant::now() + max;
    let mut drained = 0usize;
    let mut buf = [0u8; 16 * 1024];
    while drained < DRAIN_MAX {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || tcp.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

#[cfg(test)]
mod tests;
