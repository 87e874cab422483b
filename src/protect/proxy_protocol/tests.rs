//! Tests of the PROXY protocol reader: v1 and v2 tables, every truncation, bytes after the header untouched.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncWriteExt, ReadBuf};

use super::*;
use ProxyProtocolError as E;

/// What the client sends after the header; it must all still be there.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n";

fn v2(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(version_command);
    header.push(family);
    let len = u16::try_from(block.len()).expect("test block fits the length field");
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(block);
    header
}

/// 203.0.113.7:51234 -> 192.0.2.1:443.
fn v4_block() -> Vec<u8> {
    let mut block = vec![203, 0, 113, 7, 192, 0, 2, 1];
    block.extend_from_slice(&51234u16.to_be_bytes());
    block.extend_from_slice(&443u16.to_be_bytes());
    block
}

/// [2001:db8::7]:51234 -> [2001:db8::1]:443.
fn v6_block() -> Vec<u8> {
    let mut block = "2001:db8::7".parse::<Ipv6Addr>().expect("address").octets().to_vec();
    block.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().expect("address").octets());
    block.extend_from_slice(&51234u16.to_be_bytes());
    block.extend_from_slice(&443u16.to_be_bytes());
    block
}

fn proxied(source: &str, destination: &str) -> ProxyHeader {
    ProxyHeader::Proxied {
        source: source.parse().expect("source"),
        destination: destination.parse().expect("destination"),
    }
}

fn v4() -> ProxyHeader {
    proxied("203.0.113.7:51234", "192.0.2.1:443")
}

fn v6() -> ProxyHeader {
    proxied("[2001:db8::7]:51234", "[2001:db8::1]:443")
}

/// Reads a header from `input`; returns the result and the unread rest.
async fn read(input: &[u8]) -> (Result<ProxyHeader, E>, Vec<u8>) {
    let mut stream = input;
    let result = read_header(&mut stream).await;
    (result, stream.to_vec())
}

fn good_headers() -> Vec<(&'static str, Vec<u8>, ProxyHeader)> {
    let ffff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    let mut with_tlvs = v4_block();
    // PP2_TYPE_AUTHORITY "example.com", then a PP2_TYPE_NOOP of 3 bytes.
    with_tlvs.extend_from_slice(&[0x02, 0x00, 11]);
    with_tlvs.extend_from_slice(b"example.com");
    with_tlvs.extend_from_slice(&[0x04, 0x00, 3, 0, 0, 0]);
    let mut at_cap = v6_block();
    at_cap.resize(usize::from(V2_MAX_LEN), 0);
    vec![
        (
            "v1 TCP4",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n".to_vec(),
            v4(),
        ),
        (
            "v1 TCP6",
            b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n".to_vec(),
            v6(),
        ),
        (
            "v1 TCP6, longest line (104 bytes)",
            format!("PROXY TCP6 {ffff} {ffff} 65535 65535\r\n").into_bytes(),
            proxied(&format!("[{ffff}]:65535"), &format!("[{ffff}]:65535")),
        ),
        (
            "v1 TCP6, IPv4-mapped, uppercase hex",
            b"PROXY TCP6 ::FFFF:203.0.113.7 2001:DB8::1 51234 443\r\n".to_vec(),
            proxied("[::ffff:203.0.113.7]:51234", "[2001:db8::1]:443"),
        ),
        (
            "v1 TCP4, ports 0 and 65535",
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n".to_vec(),
            proxied("0.0.0.0:0", "255.255.255.255:65535"),
        ),
        ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec(), ProxyHeader::Unknown),
        (
            "v1 UNKNOWN, rest of line ignored (107 bytes)",
            format!("PROXY UNKNOWN {ffff} {ffff} 65535 65535\r\n").into_bytes(),
            ProxyHeader::Unknown,
        ),
        (
            "v1 UNKNOWN, non-text rest ignored",
            b"PROXY UNKNOWN \xff\x00 junk\r\n".to_vec(),
            ProxyHeader::Unknown,
        ),
        ("v2 TCP over IPv4", v2(0x21, 0x11, &v4_block()), v4()),
        ("v2 TCP over IPv6", v2(0x21, 0x21, &v6_block()), v6()),
        ("v2 TCP over IPv4, TLVs skipped", v2(0x21, 0x11, &with_tlvs), v4()),
        ("v2 TCP over IPv6, block at the cap", v2(0x21, 0x21, &at_cap), v6()),
        ("v2 LOCAL", v2(0x20, 0x00, &[]), ProxyHeader::Unknown),
        (
            "v2 LOCAL with addresses, skipped",
            v2(0x20, 0x11, &v4_block()),
            ProxyHeader::Unknown,
        ),
        (
            "v2 LOCAL ignores the family byte",
            v2(0x20, 0xff, &[1, 2, 3]),
            ProxyHeader::Unknown,
        ),
        ("v2 PROXY UNSPEC", v2(0x21, 0x00, &[]), ProxyHeader::Unknown),
        (
            "v2 PROXY UNSPEC with bytes, skipped",
            v2(0x21, 0x00, &[9; 20]),
            ProxyHeader::Unknown,
        ),
        ("v2 UNIX stream", v2(0x21, 0x31, &[0; 216]), ProxyHeader::Unknown),
        ("v2 UNIX datagram", v2(0x21, 0x32, &[0; 216]), ProxyHeader::Unknown),
    ]
}

#[tokio::test]
async fn every_header_is_read_to_its_end_and_not_one_byte_more() {
    for (name, header, expected) in good_headers() {
        let input = [header.as_slice(), REQUEST].concat();
        let (result, rest) = read(&input).await;
        assert_eq!(result.expect(name), expected, "{name}");
        assert_eq!(rest, REQUEST, "{name}: the request after the header must stay unread");
    }
}

#[tokio::test]
async fn a_tls_client_hello_after_the_header_stays_unread() {
    let hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    for header in [
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n".to_vec(),
        v2(0x21, 0x11, &v4_block()),
    ] {
        let (result, rest) = read(&[header.as_slice(), &hello].concat()).await;
        assert_eq!(result.expect("header"), v4());
        assert_eq!(rest, hello);
    }
}

#[tokio::test]
async fn a_header_in_one_byte_pieces_reads_the_same() {
    for (name, header, expected) in good_headers() {
        // A one-byte pipe: every read returns at most one byte.
        let (mut client, mut server) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            client.write_all(&header).await?;
            client.write_all(REQUEST).await
        });
        assert_eq!(read_header(&mut server).await.expect(name), expected, "{name}");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("rest");
        assert_eq!(rest, REQUEST, "{name}");
        writer.await.expect("writer task").expect("write");
    }
}

#[tokio::test]
async fn a_connection_closed_inside_the_header_is_truncated() {
    for (name, header, _) in good_headers() {
        for cut in 0..header.len() {
            let prefix = header.get(..cut).expect("cut within the header");
            let (result, _) = read(prefix).await;
            assert!(matches!(result, Err(E::Truncated)), "{name} cut at {cut}: {result:?}");
        }
    }
}

/// v1 lines refused as malformed, each for one rule, with the reason given.
const V1_MALFORMED: &[(&str, &[u8], &str)] = &[
    (
        "v1 LF alone ends the line",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\n",
        "line feed without a carriage return",
    ),
    (
        "v1 CR not followed by LF",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\rGET\r\n",
        "carriage return not followed by a line feed",
    ),
    (
        "v1 request where the CRLF should be",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443GET / HTTP/1.1\r\n",
        "destination port is not a decimal number in 0..=65535",
    ),
    ("v1 empty", b"PROXY \r\n", "nothing after PROXY"),
    (
        "v1 address out of range",
        b"PROXY TCP4 203.0.113.256 192.0.2.1 51234 443\r\n",
        "source address is not an IPv4 address",
    ),
    (
        "v1 IPv4 octet with heading zero",
        b"PROXY TCP4 203.0.113.07 192.0.2.1 51234 443\r\n",
        "source address is not an IPv4 address",
    ),
    (
        "v1 IPv6 address in TCP4",
        b"PROXY TCP4 2001:db8::7 192.0.2.1 51234 443\r\n",
        "source address is not an IPv4 address",
    ),
    (
        "v1 IPv4 address in TCP6",
        b"PROXY TCP6 2001:db8::7 192.0.2.1 51234 443\r\n",
        "destination address is not an IPv6 address",
    ),
    (
        "v1 IPv6 zone id",
        b"PROXY TCP6 fe80::1%eth0 2001:db8::1 51234 443\r\n",
        "source address is not an IPv6 address",
    ),
    (
        "v1 port 65536",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 443\r\n",
        "source port is not a decimal number in 0..=65535",
    ),
    (
        "v1 port with plus sign",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 +51234 443\r\n",
        "source port is not a decimal number in 0..=65535",
    ),
    (
        "v1 negative port",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 -1\r\n",
        "destination port is not a decimal number in 0..=65535",
    ),
    (
        "v1 port with heading zero",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 051234 443\r\n",
        "source port is not a decimal number in 0..=65535",
    ),
    (
        "v1 two spaces between fields",
        b"PROXY TCP4  203.0.113.7 192.0.2.1 51234 443\r\n",
        "fields are not separated by exactly one space",
    ),
    (
        "v1 two spaces after PROXY",
        b"PROXY  TCP4 203.0.113.7 192.0.2.1 51234 443\r\n",
        "fields are not separated by exactly one space",
    ),
    (
        "v1 trailing space",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443 \r\n",
        "fields are not separated by exactly one space",
    ),
    (
        "v1 tab for a space",
        b"PROXY TCP4\t203.0.113.7 192.0.2.1 51234 443\r\n",
        "protocol is not TCP4, TCP6 or UNKNOWN",
    ),
    (
        "v1 missing port",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234\r\n",
        "fewer than a protocol, two addresses and two ports",
    ),
    (
        "v1 extra field",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443 80\r\n",
        "more than a protocol, two addresses and two ports",
    ),
    (
        "v1 lowercase protocol",
        b"PROXY tcp4 203.0.113.7 192.0.2.1 51234 443\r\n",
        "protocol is not TCP4, TCP6 or UNKNOWN",
    ),
    (
        "v1 UDP4",
        b"PROXY UDP4 203.0.113.7 192.0.2.1 51234 443\r\n",
        "protocol is not TCP4, TCP6 or UNKNOWN",
    ),
    (
        "v1 UNKNOWN glued to more",
        b"PROXY UNKNOWNX\r\n",
        "protocol is not TCP4, TCP6 or UNKNOWN",
    ),
    (
        "v1 not text",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 4\xff3\r\n",
        "line is not ASCII text",
    ),
];

type Check = fn(&E) -> bool;

fn bad_headers() -> Vec<(&'static str, Vec<u8>, Check)> {
    let mut padded_to_108 = b"PROXY UNKNOWN ".to_vec();
    padded_to_108.resize(106, b'x');
    padded_to_108.extend_from_slice(b"\r\n");
    vec![
        // Not the PROXY protocol at all.
        ("HTTP request", b"GET / HTTP/1.1\r\n\r\n".to_vec(), |e| {
            matches!(e, E::NotProxyProtocol)
        }),
        (
            "TLS ClientHello",
            vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc],
            |e| matches!(e, E::NotProxyProtocol),
        ),
        (
            "lowercase proxy",
            b"proxy TCP4 203.0.113.7 192.0.2.1 51234 443\r\n".to_vec(),
            |e| matches!(e, E::NotProxyProtocol),
        ),
        (
            "v2 signature wrong after 8 bytes",
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c".to_vec(),
            |e| matches!(e, E::NotProxyProtocol),
        ),
        // v1.
        (
            "v1 no CRLF in 107 bytes",
            [b"PROXY ".as_slice(), &[b'A'; 200]].concat(),
            |e| matches!(e, E::V1TooLong),
        ),
        ("v1 CRLF ending at byte 108", padded_to_108, |e| {
            matches!(e, E::V1TooLong)
        }),
        // v2.
        ("v2 version 1", v2(0x11, 0x11, &v4_block()), |e| {
            matches!(e, E::V2UnsupportedVersion(1))
        }),
        ("v2 version 3", v2(0x31, 0x11, &v4_block()), |e| {
            matches!(e, E::V2UnsupportedVersion(3))
        }),
        ("v2 command 2", v2(0x22, 0x11, &v4_block()), |e| {
            matches!(e, E::V2UnsupportedCommand(2))
        }),
        ("v2 command 15", v2(0x2f, 0x11, &v4_block()), |e| {
            matches!(e, E::V2UnsupportedCommand(15))
        }),
        ("v2 IPv4 block of 11 bytes", v2(0x21, 0x11, &[0; 11]), |e| {
            matches!(
                e,
                E::V2AddressTooShort {
                    family: 0x11,
                    len: 11,
                    needed: 12
                }
            )
        }),
        ("v2 IPv6 family with an IPv4 block", v2(0x21, 0x21, &v4_block()), |e| {
            matches!(e, E::V2AddressTooShort { needed: 36, .. })
        }),
        ("v2 UNIX block of 12 bytes", v2(0x21, 0x31, &v4_block()), |e| {
            matches!(e, E::V2AddressTooShort { needed: 216, .. })
        }),
        ("v2 UDP over IPv4", v2(0x21, 0x12, &v4_block()), |e| {
            matches!(e, E::V2UnsupportedFamily(0x12))
        }),
        ("v2 UDP over IPv6", v2(0x21, 0x22, &v6_block()), |e| {
            matches!(e, E::V2UnsupportedFamily(0x22))
        }),
        ("v2 IPv4 without transport", v2(0x21, 0x10, &v4_block()), |e| {
            matches!(e, E::V2UnsupportedFamily(0x10))
        }),
        ("v2 unassigned family", v2(0x21, 0x41, &v4_block()), |e| {
            matches!(e, E::V2UnsupportedFamily(0x41))
        }),
        ("v2 unassigned transport", v2(0x21, 0x13, &v4_block()), |e| {
            matches!(e, E::V2UnsupportedFamily(0x13))
        }),
        (
            "v2 block above the cap",
            v2(0x21, 0x11, &vec![0; usize::from(V2_MAX_LEN) + 1]),
            |e| matches!(e, E::V2TooLong(4097)),
        ),
        // Cut short.
        ("nothing", Vec::new(), |e| matches!(e, E::Truncated)),
        ("4 bytes", b"PROX".to_vec(), |e| matches!(e, E::Truncated)),
        (
            "v1 without its CRLF",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443".to_vec(),
            |e| matches!(e, E::Truncated),
        ),
        (
            "v2 block shorter than announced",
            {
                let mut header = v2(0x21, 0x11, &v4_block());
                header.pop();
                header
            },
            |e| matches!(e, E::Truncated),
        ),
    ]
}

#[tokio::test]
async fn malformed_v1_lines_are_refused() {
    for (name, input, reason) in V1_MALFORMED {
        let (result, _) = read(input).await;
        match result {
            Err(E::V1Malformed(given)) => assert_eq!(given, *reason, "{name}"),
            other => panic!("{name}: expected V1Malformed, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn bad_headers_are_refused() {
    for (name, input, check) in bad_headers() {
        let (result, _) = read(&input).await;
        match result {
            Err(error) => assert!(check(&error), "{name}: wrong error {error:?}"),
            Ok(header) => panic!("{name}: accepted as {header:?}"),
        }
    }
}

#[tokio::test]
async fn an_oversized_v1_line_is_not_read_past_107_bytes() {
    let input = [b"PROXY ".as_slice(), &[b'A'; 200]].concat();
    let (result, rest) = read(&input).await;
    assert!(matches!(result, Err(E::V1TooLong)), "{result:?}");
    assert_eq!(rest.len(), input.len() - V1_MAX_LEN);
}

#[tokio::test]
async fn a_v2_length_above_the_cap_is_refused_before_reading_the_block() {
    let mut header = v2(0x21, 0x11, &[]);
    header.truncate(14);
    header.extend_from_slice(&u16::MAX.to_be_bytes());
    let (result, rest) = read(&[header.as_slice(), REQUEST].concat()).await;
    assert!(matches!(result, Err(E::V2TooLong(u16::MAX))), "{result:?}");
    assert_eq!(rest, REQUEST);
}

/// A socket whose every read fails, as after a reset.
struct Reset;

impl AsyncRead for Reset {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
    }
}

#[tokio::test]
async fn a_read_error_is_reported_as_io() {
    let result = read_header(&mut Reset).await;
    match result {
        Err(E::Io(error)) => assert_eq!(error.kind(), io::ErrorKind::ConnectionReset),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn messages_name_the_protocol_and_have_no_trailing_period() {
    let errors = [
        E::Io(io::ErrorKind::ConnectionReset.into()),
        E::Truncated,
        E::NotProxyProtocol,
        E::V1TooLong,
        E::V1Malformed("source port is not a decimal number in 0..=65535"),
        E::V2UnsupportedVersion(1),
        E::V2UnsupportedCommand(2),
        E::V2UnsupportedFamily(0x12),
        E::V2TooLong(5000),
        E::V2AddressTooShort {
            family: 0x11,
            len: 11,
            needed: 12,
        },
    ];
    for error in errors {
        let message = error.to_string();
        assert!(message.starts_with("PROXY protocol "), "{message}");
        assert!(!message.ends_with('.'), "{message}");
    }
    assert_eq!(
        E::V2AddressTooShort {
            family: 0x11,
            len: 11,
            needed: 12
        }
        .to_string(),
        "PROXY protocol v2 address block too short: 11 bytes where family 0x11 needs 12"
    );
}
