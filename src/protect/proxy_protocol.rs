//! The PROXY protocol (HAProxy's, versions 1 and 2): how a TCP load
//! balancer in front of a listener tells the proxy who the client is.
//!
//! A TCP balancer (HAProxy, AWS NLB, nginx `stream`) opens its own
//! connection to the proxy, so the socket's peer is the balancer and every
//! client would look alike to the IP lists, limits and logs. With the PROXY
//! protocol the balancer writes one header that names the client before any
//! byte of the client's own. [`read_header`] takes exactly that header off
//! the stream and returns a [`ProxyHeader`]; the TLS ClientHello or HTTP
//! request behind it stays unread, for the server to take as if the header
//! had never been there. v1 is a text line
//! (`PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n`), v2 a binary block;
//! the first 8 bytes tell which.
//!
//! Parsing is strict, as the specification asks: whatever does not match it
//! exactly is a [`ProxyProtocolError`] and the caller closes the
//! connection. A listener that expects the header must require it, and only
//! trusted balancers should reach it: accepting connections without a
//! header too would let any client that reaches the port claim any address.
//!
//! Choices where the specification leaves room:
//!
//! - v2 blocks (addresses plus TLVs) are capped at [`V2_MAX_LEN`], 4096
//!   bytes. The largest address block is 216 bytes (AF_UNIX); the TLVs that
//!   balancers send (AWS VPC endpoint id, TLS version, SNI, client
//!   certificate CN) add tens or hundreds more. The cap bounds what one
//!   connection makes us read and hold before it has said anything; the
//!   protocol itself would allow 65535.
//! - v2 UDP (`0x12`, `0x22`) is refused. The specification lets a receiver
//!   fall back to the connection's own addresses for families it does not
//!   support, but a UDP flow announced on a TCP connection means a
//!   misconfigured sender, and falling back would silently put every client
//!   behind the balancer's address. AF_UNIX and AF_UNSPEC, which a correct
//!   sender does use, give [`ProxyHeader::Unknown`].
//! - Heading zeroes in v1 ports and IPv4 octets are refused (the
//!   specification forbids them, against octal confusion). IPv6 addresses
//!   are what [`std::net::Ipv6Addr`] parses, which includes the mixed form
//!   `::ffff:192.0.2.1`. IPv4-mapped IPv6 addresses are returned as they
//!   came; the caller canonicalizes them as it does peer addresses.
//!
//! [`read_header`] has no timer of its own: the caller bounds it like any
//! other read from a client that may never send.
//!
//! Specification: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// What a PROXY protocol header said about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The real client and the address it connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v1 `UNKNOWN`, v2 `LOCAL` command, or a v2 family the proxy does not
    /// map to an IP (AF_UNSPEC, AF_UNIX): the connection's own peer address
    /// stands.
    Unknown,
}

/// Why a connection did not start with a usable PROXY protocol header. Every
/// one of them means: close the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("PROXY protocol header read failed: {0}")]
    Io(#[source] std::io::Error),
    /// The peer closed the connection before the header was complete.
    #[error("PROXY protocol header cut short: the connection closed inside it")]
    Truncated,
    #[error("PROXY protocol header missing: the connection starts with neither the v1 nor the v2 signature")]
    NotProxyProtocol,
    #[error("PROXY protocol v1 header too long: no CRLF within {V1_MAX_LEN} bytes")]
    V1TooLong,
    #[error("PROXY protocol v1 header malformed: {0}")]
    V1Malformed(&'static str),
    #[error("PROXY protocol v2 header has unsupported version {0}, expected 2")]
    V2UnsupportedVersion(u8),
    #[error("PROXY protocol v2 header has unknown command {0}, expected 0 (LOCAL) or 1 (PROXY)")]
    V2UnsupportedCommand(u8),
    #[error("PROXY protocol v2 header has unsupported address family and transport 0x{0:02x}")]
    V2UnsupportedFamily(u8),
    #[error("PROXY protocol v2 header too long: {0} bytes of addresses and TLVs, the limit is {V2_MAX_LEN}")]
    V2TooLong(u16),
    #[error("PROXY protocol v2 address block too short: {len} bytes where family 0x{family:02x} needs {needed}")]
    V2AddressTooShort { family: u8, len: u16, needed: u16 },
}

impl From<std::io::Error> for ProxyProtocolError {
    /// A peer that hangs up mid-header is common (port scanners, balancer
    /// health checks that give up) and not an I/O fault, so it gets its own
    /// variant; `?` on any read maps it.
    fn from(error: std::io::Error) -> Self {
        if error.kind() == std::io::ErrorKind::UnexpectedEof {
            ProxyProtocolError::Truncated
        } else {
            ProxyProtocolError::Io(error)
        }
    }
}

/// The longest v1 line the specification allows, CRLF included: `UNKNOWN`
/// followed by two full-length IPv6 addresses and two 5-digit ports.
pub const V1_MAX_LEN: usize = 107;

/// The most bytes accepted after the 16-byte v2 fixed header (addresses and
/// TLVs); see the module documentation for why 4096.
pub const V2_MAX_LEN: u16 = 4096;

/// The v1 signature, trailing space included.
const V1_PREFIX: &[u8] = b"PROXY ";

/// The 12-byte v2 signature `\r\n\r\n\0\r\nQUIT\n`, split where the first
/// read ends: the head tells v2 from v1, the tail is checked with the rest of
/// the fixed header.
const V2_SIGNATURE_HEAD: [u8; 8] = *b"\r\n\r\n\0\r\nQ";
const V2_SIGNATURE_TAIL: [u8; 4] = *b"UIT\n";

const V2_COMMAND_LOCAL: u8 = 0x0;
const V2_COMMAND_PROXY: u8 = 0x1;

/// Reads exactly one PROXY protocol header (v1 or v2, detected from the
/// first bytes) from the start of `stream`, and not one byte more: whatever
/// follows (a TLS ClientHello, an HTTP request) stays unread in the stream.
///
/// There is no peeking on an `AsyncRead`, so a v1 line is read a byte at a
/// time: about 50 one-byte reads for a TCP4 line, once per connection. A
/// caller that minds the system calls can pass a `tokio::io::BufReader`
/// around the socket and keep using that reader afterwards, since the
/// bytes it buffered past the header are served from it.
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<ProxyHeader, ProxyProtocolError> {
    // Every header is longer than 8 bytes (the shortest, `PROXY
    // UNKNOWN\r\n`, has 15), so this first read cannot overrun one.
    let mut start = [0u8; 8];
    stream.read_exact(&mut start).await?;
    if start == V2_SIGNATURE_HEAD {
        read_v2(stream).await
    } else if start.starts_with(V1_PREFIX) {
        read_v1(stream, start).await
    } else {
        Err(ProxyProtocolError::NotProxyProtocol)
    }
}

/// The bytes of a v1 line: first those already read with the signature,
/// then from the stream, one at a time so the read stops at the LF.
struct V1Bytes<'a, S> {
    stream: &'a mut S,
    pending: std::iter::Skip<std::array::IntoIter<u8, 8>>,
    /// Bytes of the line taken so far, `PROXY ` included.
    taken: usize,
}

impl<S: AsyncRead + Unpin> V1Bytes<'_, S> {
    /// The next byte, or `V1TooLong` instead of reading byte 108.
    async fn next(&mut self) -> Result<u8, ProxyProtocolError> {
        if self.taken >= V1_MAX_LEN {
            return Err(ProxyProtocolError::V1TooLong);
        }
        self.taken += 1;
        match self.pending.next() {
            Some(byte) => Ok(byte),
            None => Ok(self.stream.read_u8().await?),
        }
    }
}

async fn read_v1<S: AsyncRead + Unpin>(stream: &mut S, start: [u8; 8]) -> Result<ProxyHeader, ProxyProtocolError> {
    let mut bytes = V1Bytes {
        stream,
        pending: start.into_iter().skip(V1_PREFIX.len()),
        taken: V1_PREFIX.len(),
    };
    // The line after `PROXY ` and before the CRLF. The signature holds no CR
    // or LF, so the earliest the line can end is on the last byte of `start`:
    // nothing already read lies past it.
    let mut line = [0u8; V1_MAX_LEN];
    let mut len = 0;
    loop {
        match bytes.next().await? {
            b'\r' => {
                if bytes.next().await? == b'\n' {
                    break;
                }
                return Err(ProxyProtocolError::V1Malformed(
                    "carriage return not followed by a line feed",
                ));
            }
            b'\n' => return Err(ProxyProtocolError::V1Malformed("line feed without a carriage return")),
            byte => {
                // `next` stops at 107 bytes, which always fit: unreachable.
                let Some(slot) = line.get_mut(len) else {
                    return Err(ProxyProtocolError::V1TooLong);
                };
                *slot = byte;
                len += 1;
            }
        }
    }
    parse_v1(line.get(..len).unwrap_or_default())
}

/// Parses a v1 line without its `PROXY ` and CRLF:
/// `TCP4 203.0.113.7 192.0.2.1 51234 443`, `TCP6 ...` or `UNKNOWN ...`.
fn parse_v1(line: &[u8]) -> Result<ProxyHeader, ProxyProtocolError> {
    use ProxyProtocolError::V1Malformed;

    if let Some(rest) = line.strip_prefix(b"UNKNOWN") {
        // The specification has the receiver ignore whatever follows
        // UNKNOWN up to the CRLF, which need not be text.
        if rest.is_empty() || rest.starts_with(b" ") {
            return Ok(ProxyHeader::Unknown);
        }
    }
    if line.is_empty() {
        return Err(V1Malformed("nothing after PROXY"));
    }
    if !line.is_ascii() {
        return Err(V1Malformed("line is not ASCII text"));
    }
    let text = std::str::from_utf8(line).map_err(|_| V1Malformed("line is not ASCII text"))?;
    let mut fields = text.split(' ');
    let protocol = next_field(&mut fields)?;
    let (source, destination) = match protocol {
        "TCP4" => (
            address::<Ipv4Addr>(next_field(&mut fields)?, "source address is not an IPv4 address")?.into(),
            address::<Ipv4Addr>(next_field(&mut fields)?, "destination address is not an IPv4 address")?.into(),
        ),
        "TCP6" => (
            address::<Ipv6Addr>(next_field(&mut fields)?, "source address is not an IPv6 address")?.into(),
            address::<Ipv6Addr>(next_field(&mut fields)?, "destination address is not an IPv6 address")?.into(),
        ),
        _ => return Err(V1Malformed("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let source_port = port(
        next_field(&mut fields)?,
        "source port is not a decimal number in 0..=65535",
    )?;
    let destination_port = port(
        next_field(&mut fields)?,
        "destination port is not a decimal number in 0..=65535",
    )?;
    match fields.next() {
        None => Ok(ProxyHeader::Proxied {
            source: SocketAddr::new(source, source_port),
            destination: SocketAddr::new(destination, destination_port),
        }),
        Some("") => Err(V1Malformed("fields are not separated by exactly one space")),
        Some(_) => Err(V1Malformed("more than a protocol, two addresses and two ports")),
    }
}

/// The next space-separated field of a v1 line. An empty one means two
/// spaces in a row, or one at an end.
fn next_field<'a>(fields: &mut std::str::Split<'a, char>) -> Result<&'a str, ProxyProtocolError> {
    match fields.next() {
        Some("") => Err(ProxyProtocolError::V1Malformed(
            "fields are not separated by exactly one space",
        )),
        Some(field) => Ok(field),
        None => Err(ProxyProtocolError::V1Malformed(
            "fewer than a protocol, two addresses and two ports",
        )),
    }
}

/// std's address parsers already refuse heading zeroes in IPv4 octets, zone
/// ids and surrounding spaces, as the specification wants.
fn address<A: FromStr>(field: &str, error: &'static str) -> Result<A, ProxyProtocolError> {
    field.parse().map_err(|_| ProxyProtocolError::V1Malformed(error))
}

/// A v1 port. `u16::from_str` alone would take `+80` and `080`; the
/// specification allows neither sign nor heading zeroes.
fn port(field: &str, error: &'static str) -> Result<u16, ProxyProtocolError> {
    let digits = !field.is_empty() && field.bytes().all(|byte| byte.is_ascii_digit());
    let heading_zero = field.len() > 1 && field.starts_with('0');
    if !digits || heading_zero {
        return Err(ProxyProtocolError::V1Malformed(error));
    }
    field.parse().map_err(|_| ProxyProtocolError::V1Malformed(error))
}

/// The v2 address families this module accepts with the PROXY command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Unspec,
    TcpV4,
    TcpV6,
    Unix,
}

impl Family {
    fn from_byte(byte: u8) -> Result<Family, ProxyProtocolError> {
        match byte {
            0x00 => Ok(Family::Unspec),
            0x11 => Ok(Family::TcpV4),
            0x21 => Ok(Family::TcpV6),
            // Stream or datagram, a UNIX socket has no IP to report.
            0x31 | 0x32 => Ok(Family::Unix),
            // UDP (0x12, 0x22): refused, see the module documentation.
            // Anything else is unassigned, and the specification wants it
            // rejected.
            other => Err(ProxyProtocolError::V2UnsupportedFamily(other)),
        }
    }

    /// Bytes of the address block: two addresses, then two ports for TCP.
    fn address_len(self) -> u16 {
        match self {
            Family::Unspec => 0,
            Family::TcpV4 => 2 * 4 + 2 * 2,
            Family::TcpV6 => 2 * 16 + 2 * 2,
            Family::Unix => 2 * 108,
        }
    }
}

/// Reads the rest of a v2 header, the first 8 bytes of the signature
/// being read: 8 more bytes of fixed header, then exactly `len` bytes.
async fn read_v2<S: AsyncRead + Unpin>(stream: &mut S) -> Result<ProxyHeader, ProxyProtocolError> {
    let mut fixed = [0u8; 8];
    stream.read_exact(&mut fixed).await?;
    let [s8, s9, s10, s11, version_command, family_byte, len_high, len_low] = fixed;
    if [s8, s9, s10, s11] != V2_SIGNATURE_TAIL {
        return Err(ProxyProtocolError::NotProxyProtocol);
    }
    let version = version_command >> 4;
    if version != 2 {
        return Err(ProxyProtocolError::V2UnsupportedVersion(version));
    }
    let len = u16::from_be_bytes([len_high, len_low]);
    if len > V2_MAX_LEN {
        return Err(ProxyProtocolError::V2TooLong(len));
    }
    let family = match version_command & 0x0f {
        // LOCAL (a balancer's health check): the specification has the
        // receiver ignore the family and skip the block, whatever is in it.
        V2_COMMAND_LOCAL => None,
        V2_COMMAND_PROXY => {
            let family = Family::from_byte(family_byte)?;
            let needed = family.address_len();
            if len < needed {
                return Err(ProxyProtocolError::V2AddressTooShort {
                    family: family_byte,
                    len,
                    needed,
                });
            }
            Some(family)
        }
        command => return Err(ProxyProtocolError::V2UnsupportedCommand(command)),
    };
    // The whole block, TLVs included, comes off the stream so that none of
    // it is left in front of the client's first byte; the TLVs themselves
    // are not interpreted.
    let mut block = vec![0u8; usize::from(len)];
    stream.read_exact(&mut block).await?;
    let too_short = || ProxyProtocolError::V2AddressTooShort {
        family: family_byte,
        len,
        needed: family.map_or(0, Family::address_len),
    };
    match family {
        None | Some(Family::Unspec | Family::Unix) => Ok(ProxyHeader::Unknown),
        Some(Family::TcpV4) => {
            let (source, destination, source_port, destination_port) = addresses::<4>(&block).ok_or_else(too_short)?;
            Ok(ProxyHeader::Proxied {
                source: SocketAddr::new(Ipv4Addr::from(source).into(), source_port),
                destination: SocketAddr::new(Ipv4Addr::from(destination).into(), destination_port),
            })
        }
        Some(Family::TcpV6) => {
            let (source, destination, source_port, destination_port) = addresses::<16>(&block).ok_or_else(too_short)?;
            Ok(ProxyHeader::Proxied {
                source: SocketAddr::new(Ipv6Addr::from(source).into(), source_port),
                destination: SocketAddr::new(Ipv6Addr::from(destination).into(), destination_port),
            })
        }
    }
}

/// Splits a TCP address block of `N`-byte addresses: source address,
/// destination address, source port, destination port, in network order.
/// `None` if the block is too short, which the length check already ruled
/// out.
fn addresses<const N: usize>(block: &[u8]) -> Option<([u8; N], [u8; N], u16, u16)> {
    let (source, rest) = block.split_first_chunk::<N>()?;
    let (destination, rest) = rest.split_first_chunk::<N>()?;
    let (source_port, rest) = rest.split_first_chunk::<2>()?;
    let destination_port = rest.first_chunk::<2>()?;
    Some((
        *source,
        *destination,
        u16::from_be_bytes(*source_port),
        u16::from_be_bytes(*destination_port),
    ))
}

#[cfg(test)]
mod tests;
