//! Test doubles of K3s — **not K3s**. A real K3s binary cannot be downloaded where basalt
//! is built and tested, so the tests that need "k3s" use these instead:
//!
//! - [`K3sServerDouble`]: the host side. A TLS listener with its own CA that answers the
//!   two requests a joining agent makes before it sends credentials, `GET /cacerts` and
//!   `GET /ping`, hands out K3s-format tokens pinning that CA, and issues the kubelet
//!   client certificate (`GET /v1-k3s/client-kubelet.crt`) to an agent that presents a
//!   token's password, as K3s's supervisor does when it registers a node.
//! - the `k3s-agent-double` binary: the guest side, carried by the test image as its `k3s`
//!   input. Run as `k3s agent --config FILE`, it reads the config basalt-init wrote,
//!   performs the same CA-hash check `k3s agent` does (through
//!   [`basalt_api::k3s::check_server_ca`]), fetches its kubelet client certificate with
//!   the token's password and writes it where K3s does
//!   (`<data-dir>/agent/client-kubelet.crt`), prints what it was given on lines starting
//!   with [`LINE_PREFIX`], and stays up until SIGTERM. Its logic is in [`agent`].
//!   Where K3s retries a refused registration in-process every 5 s, the double exits 1:
//!   either way the node never registers; the double's way lets a test see PID1's
//!   crash-loop report.
//!
//!   Like the real `k3s`, the double first makes sure its userspace is extracted into
//!   `<data-dir>/data/<hash>` ([`userspace`]: the first run writes and verifies a few MiB
//!   there, later runs find it and write nothing), for `k3s agent` and for
//!   `k3s ctr --version` (which basalt-init runs in standby for exactly that), and the
//!   registered agent imports `<data-dir>/agent/images/` honouring K3s's `.cache.json`
//!   ([`images`]). Each says on its own line which it did.
//!
//! The real pinned K3s is what `images/k3s-node.toml` builds with; nothing here is
//! installed into a production image.

pub mod agent;
pub mod images;
mod server;
mod static_build;
pub mod userspace;

pub use server::{K3sServerDouble, ServerDoubleError, AGENT_USER, CLIENT_KUBELET_PATH};
pub use static_build::build_agent_double;

/// Every line the agent double prints starts with this, so a test can pick its lines out
/// of a serial console.
pub const LINE_PREFIX: &str = "k3s-agent-double:";
/// After [`LINE_PREFIX`]: the agent double's line with its (cold, first) CA check's step
/// times, `connected 2, handshake 60, response 64, verified 70, hashed 71` in ms from the
/// check's start (`basalt_api::k3s::CheckTimes::describe`).
pub const CHECK_TIMES: &str = "ca-check times ms: ";
