//! The original destination of a connection that iptables `REDIRECT`ed to
//! one of the agent's ports (DESIGN §6): `getsockopt(SO_ORIGINAL_DST)`.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` from `<linux/netfilter_ipv4.h>`; the IPv6 option
/// (`IP6T_SO_ORIGINAL_DST`) has the same number.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// Where the client meant to connect before the `nat` table redirected it.
/// Fails (`ENOENT`) on a connection that was not redirected.
pub fn original_dst(stream: &impl AsRawFd) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    // Try IPv4 first (the capture rules are IPv4), then IPv6.
    match original_dst_v4(fd) {
        Ok(addr) => Ok(addr),
        Err(v4_err) => original_dst_v6(fd).map_err(|_| v4_err),
    }
}

fn original_dst_v4(fd: libc::c_int) -> io::Result<SocketAddr> {
    // SAFETY: `addr` is a plain C struct, zero is a valid value, and `len`
    // tells the kernel how much of it may be written.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket borrowed for the call; the pointers
    // are valid for `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(addr.sin_port),
    )))
}

fn original_dst_v6(fd: libc::c_int) -> io::Result<SocketAddr> {
    // SAFETY: as above.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: as above.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IPV6,
            SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(addr.sin6_addr.s6_addr),
        u16::from_be(addr.sin6_port),
        addr.sin6_flowinfo,
        addr.sin6_scope_id,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_reports_where_it_arrived() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // Without conntrack the kernel has no record (an error); with it, the
        // original tuple is the one the connection really has. Never another
        // address. (A real redirect is tested in network namespaces.)
        if let Ok(original) = original_dst(&server) {
            assert_eq!(original, addr);
        }
    }
}
