//! Port 68 on one interface.
//!
//! A plain UDP socket rather than AF_PACKET: with SO_BINDTODEVICE, Linux sends to
//! 255.255.255.255 out of that interface with source 0.0.0.0 even before it has an
//! address, and delivers limited broadcasts to a socket bound to 0.0.0.0:68. That is
//! all DHCP needs as long as the client asks servers to broadcast their replies until
//! bound (the BROADCAST flag, set by the machine), and it spares us building IP and UDP
//! headers and a BPF filter by hand.

use super::{Destination, Transport};
use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
};
use std::ffi::OsString;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

const CLIENT_PORT: u16 = 68;
const SERVER_PORT: u16 = 67;
/// Larger than any DHCP packet on a 1500-byte MTU.
const MAX_PACKET: usize = 1536;

pub struct UdpTransport {
    socket: UdpSocket,
}

impl UdpTransport {
    pub fn bind(iface: &str) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        setsockopt(&fd, sockopt::Broadcast, &true)?;
        setsockopt(&fd, sockopt::BindToDevice, &OsString::from(iface))?;
        bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, CLIENT_PORT))?;
        Ok(Self {
            socket: UdpSocket::from(fd),
        })
    }
}

impl Transport for UdpTransport {
    fn send(&mut self, packet: &[u8], to: Destination) -> io::Result<()> {
        let ip = match to {
            Destination::Broadcast => Ipv4Addr::BROADCAST,
            Destination::Server(ip) => ip,
        };
        self.socket
            .send_to(packet, SocketAddrV4::new(ip, SERVER_PORT))
            .map(drop)
    }

    fn recv(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        // A zero timeout would mean "block forever" to SO_RCVTIMEO.
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut buf = vec![0u8; MAX_PACKET];
        match self.socket.recv_from(&mut buf) {
            Ok((n, _)) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }
}
