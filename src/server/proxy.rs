//! The PROXY protocol (versions 1 and 2), so that a server behind a load balancer sees
//! each client's own address (`--proxy-protocol`).
//!
//! A proxy in TCP mode (HAProxy's `send-proxy-v2`) opens its connection to us with a
//! short header naming the client's address, then passes the client's bytes through,
//! TLS included. Without it, every client would come from the proxy's address, and
//! `--max-connections-per-ip` would hold all of them under one share. The header is
//! read before anything else on the chat and web listeners; a connection that does not
//! start with one is closed, since a client that could omit it could also forge it: with
//! `--proxy-protocol`, only the proxy may reach those listeners.
//!
//! The parsing is sans-IO ([`parse_v1`], [`parse_v2`]) with unit tests from the
//! specification's examples; [`read`] only reads exactly the header's bytes, so what the
//! client sent after it stays in the socket for the reader or for TLS. A version 2
//! header is read whole (up to 64 KiB, with whatever TLVs the proxy adds) and its TLVs
//! are skipped.
//!
//! Specification: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use futures::{AsyncRead, AsyncReadExt};

/// The twelve bytes every version 2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A whole version 2 `LOCAL` header: what a proxy's own health check sends, and what
/// `chat-client --proxy-local` sends to probe a server run with `--proxy-protocol`.
pub const LOCAL_V2: [u8; 16] = *b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
/// A version 1 header is one line of at most this many bytes, CRLF included.
const V1_MAX: usize = 107;
/// A version 2 header's addresses and TLVs: up to 64 KiB (its length is 16 bits), read
/// whole; HAProxy's TLVs (SSL details, a unique id) stay far below it, and only the
/// proxy, which is trusted, can send one.
const V2_MAX_BODY: usize = u16::MAX as usize;

/// Whom a proxied connection is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxied {
    /// A client at this address.
    Client(SocketAddr),
    /// The proxy itself (a health check: `LOCAL`, `UNKNOWN`, or a family other than
    /// TCP over IPv4 or IPv6): the connection counts as the proxy's.
    Local,
}

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no PROXY protocol header (the connection did not come through the proxy)")]
    Missing,
    #[error("a bad PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one PROXY header (either version) from the start of `r`, and nothing past it.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Proxied, Error> {
    let mut start = [0u8; 6];
    r.read_exact(&mut start).await?;
    if &start == b"PROXY " {
        let mut line = start.to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(Error::Malformed("a version 1 line longer than 107 bytes"));
            }
            let mut byte = [0u8; 1];
            r.read_exact(&mut byte).await?;
            line.push(byte[0]);
        }
        return parse_v1(&line);
    }
    if start != V2_SIGNATURE[..6] {
        return Err(Error::Missing);
    }
    let mut head = [0u8; 16];
    head[..6].copy_from_slice(&start);
    r.read_exact(&mut head[6..]).await?;
    let len = v2_body_len(&head)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    parse_v2(&head, &body)
}

/// A version 1 line, `PROXY TCP4 <src> <dst> <sport> <dport>\r\n` (or `TCP6`, or
/// `UNKNOWN` with anything after it).
pub fn parse_v1(line: &[u8]) -> Result<Proxied, Error> {
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or(Error::Malformed("a version 1 line without CRLF"))?;
    let line = std::str::from_utf8(line).map_err(|_| Error::Malformed("not ASCII"))?;
    let mut words = line.split(' ');
    if words.next() != Some("PROXY") {
        return Err(Error::Missing);
    }
    let family = words.next();
    if family == Some("UNKNOWN") {
        return Ok(Proxied::Local);
    }
    let (Some(src), Some(_dst), Some(sport), Some(_dport), None) = (
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
    ) else {
        return Err(Error::Malformed("a version 1 line needs four fields"));
    };
    let ip: IpAddr = match family {
        Some("TCP4") => src
            .parse::<Ipv4Addr>()
            .map_err(|_| Error::Malformed("a bad IPv4 source"))?
            .into(),
        Some("TCP6") => src
            .parse::<Ipv6Addr>()
            .map_err(|_| Error::Malformed("a bad IPv6 source"))?
            .into(),
        _ => return Err(Error::Malformed("an unknown version 1 family")),
    };
    let port = sport
        .parse::<u16>()
        .map_err(|_| Error::Malformed("a bad source port"))?;
    Ok(Proxied::Client(SocketAddr::new(ip, port)))
}

/// The length of what follows a version 2 header's 16 bytes, checked.
fn v2_body_len(head: &[u8; 16]) -> Result<usize, Error> {
    if head[..12] != V2_SIGNATURE {
        return Err(Error::Missing);
    }
    if head[12] >> 4 != 2 {
        return Err(Error::Malformed("a version other than 2"));
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_BODY {
        return Err(Error::Malformed("a version 2 header longer than 64 KiB"));
    }
    Ok(len)
}

/// A version 2 header: its 16 fixed bytes and the `len` after them (addresses, TLVs).
pub fn parse_v2(head: &[u8; 16], body: &[u8]) -> Result<Proxied, Error> {
    let len = v2_body_len(head)?;
    if body.len() != len {
        return Err(Error::Malformed("a version 2 body of the wrong length"));
    }
    match head[12] & 0x0F {
        0 => return Ok(Proxied::Local),
        1 => {}
        _ => return Err(Error::Malformed("an unknown version 2 command")),
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    match head[13] {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 if len >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(Proxied::Client(SocketAddr::new(ip.into(), port(8))))
        }
        // TCP over IPv6.
        0x21 if len >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            Ok(Proxied::Client(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                port(32),
            )))
        }
        0x11 | 0x21 => Err(Error::Malformed("addresses shorter than their family")),
        // UNSPEC, UDP, UNIX: nothing we can count a client by.
        _ => Ok(Proxied::Local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn read_all(bytes: &[u8]) -> (Result<Proxied, Error>, Vec<u8>) {
        futures::executor::block_on(async {
            let mut r = Cursor::new(bytes.to_vec());
            let got = read(&mut r).await;
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest).await;
            (got, rest)
        })
    }

    #[test]
    fn version_2_tcp4_names_the_client_and_leaves_the_rest() {
        // 192.0.2.7:40000 -> 198.51.100.1:8888, then a TLV (type 4, NOOP, 2 bytes).
        let mut body = vec![192, 0, 2, 7, 198, 51, 100, 1];
        body.extend_from_slice(&40000u16.to_be_bytes());
        body.extend_from_slice(&8888u16.to_be_bytes());
        body.extend_from_slice(&[4, 0, 2, 0xAA, 0xBB]);
        let mut bytes = v2(1, 0x11, &body);
        bytes.extend_from_slice(b"after");
        let (got, rest) = read_all(&bytes);
        assert_eq!(
            got.expect("parses"),
            Proxied::Client("192.0.2.7:40000".parse().expect("addr"))
        );
        assert_eq!(rest, b"after", "nothing past the header is read");
    }

    #[test]
    fn version_2_tcp6_local_and_other_families() {
        let mut body = vec![0u8; 36];
        body[..16].copy_from_slice(&"2001:db8::5".parse::<Ipv6Addr>().expect("v6").octets());
        body[32..34].copy_from_slice(&443u16.to_be_bytes());
        let (got, _) = read_all(&v2(1, 0x21, &body));
        assert_eq!(
            got.expect("parses"),
            Proxied::Client("[2001:db8::5]:443".parse().expect("addr"))
        );
        let (local, _) = read_all(&v2(0, 0x00, &[]));
        assert_eq!(local.expect("parses"), Proxied::Local, "a health check");
        assert_eq!(LOCAL_V2.to_vec(), v2(0, 0x00, &[]));
        let (unix, _) = read_all(&v2(1, 0x31, &[0u8; 216]));
        assert_eq!(unix.expect("parses"), Proxied::Local);
    }

    #[test]
    fn version_1_lines() {
        let (got, rest) = read_all(b"PROXY TCP4 192.0.2.9 198.51.100.1 5555 8888\r\nhi");
        assert_eq!(
            got.expect("parses"),
            Proxied::Client("192.0.2.9:5555".parse().expect("addr"))
        );
        assert_eq!(rest, b"hi");
        let (got, _) = read_all(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n");
        assert_eq!(
            got.expect("parses"),
            Proxied::Client("[2001:db8::1]:1".parse().expect("addr"))
        );
        let (got, _) = read_all(b"PROXY UNKNOWN\r\n");
        assert_eq!(got.expect("parses"), Proxied::Local);
    }

    #[test]
    fn anything_else_is_refused_without_reading_far() {
        // The seed's client: a chat frame, not a header.
        let frame = [0, 0, 0, 1, 0, 0, 0, 2, 1, 0, 0, 0, 2, b'h', b'i'];
        assert!(matches!(read_all(&frame).0, Err(Error::Missing)));
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(
            read_all(long.as_bytes()).0,
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            read_all(b"PROXY TCP4 nonsense 1.2.3.4 1 2\r\n").0,
            Err(Error::Malformed(_))
        ));
        let mut cut = V2_SIGNATURE.to_vec();
        cut.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert!(
            matches!(read_all(&cut).0, Err(Error::Io(_))),
            "64 KiB announced, not sent"
        );
        let mut v3 = v2(1, 0x11, &[0u8; 12]);
        v3[12] = 0x31;
        assert!(matches!(read_all(&v3).0, Err(Error::Malformed(_))));
        let short = v2(1, 0x11, &[0u8; 4]);
        assert!(matches!(read_all(&short).0, Err(Error::Malformed(_))));
        assert!(matches!(read_all(b"PRO").0, Err(Error::Io(_))), "cut short");
    }
}
