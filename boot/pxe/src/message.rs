//! DHCPv4 messages (RFC 2131/2132), sans IO.
//!
//! A small codec of our own: the fixed BOOTP header, the magic cookie and the options as
//! (code, bytes) in order, with split options joined (RFC 3396). Parsing never panics
//! on any input (it is fuzzed). (A general crate such as `dhcproto` brings a DNS stack of
//! ~57 crates along; a boot server needs this much.)

use std::net::Ipv4Addr;

/// BOOTREQUEST.
pub const BOOTREQUEST: u8 = 1;
/// BOOTREPLY.
pub const BOOTREPLY: u8 = 2;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const HEADER: usize = 236;

/// DHCP message types (option 53).
pub mod kind {
    /// DHCPDISCOVER.
    pub const DISCOVER: u8 = 1;
    /// DHCPOFFER.
    pub const OFFER: u8 = 2;
    /// DHCPREQUEST.
    pub const REQUEST: u8 = 3;
    /// DHCPDECLINE.
    pub const DECLINE: u8 = 4;
    /// DHCPACK.
    pub const ACK: u8 = 5;
    /// DHCPNAK.
    pub const NAK: u8 = 6;
    /// DHCPRELEASE.
    pub const RELEASE: u8 = 7;
    /// DHCPINFORM.
    pub const INFORM: u8 = 8;
}

/// Option codes used here.
pub mod opt {
    /// Subnet mask.
    pub const SUBNET_MASK: u8 = 1;
    /// Routers.
    pub const ROUTER: u8 = 3;
    /// DNS servers.
    pub const DNS: u8 = 6;
    /// Host name.
    pub const HOSTNAME: u8 = 12;
    /// Vendor-specific information (PXE's sub-options).
    pub const VENDOR: u8 = 43;
    /// Requested IP address.
    pub const REQUESTED_IP: u8 = 50;
    /// Boot file name.
    pub const BOOTFILE: u8 = 67;
    /// Lease time.
    pub const LEASE_TIME: u8 = 51;
    /// Message type.
    pub const MESSAGE_TYPE: u8 = 53;
    /// Server identifier.
    pub const SERVER_ID: u8 = 54;
    /// Vendor class identifier (`PXEClient:Arch:...`).
    pub const VENDOR_CLASS: u8 = 60;
    /// Client identifier.
    pub const CLIENT_ID: u8 = 61;
    /// User class (`iPXE`).
    pub const USER_CLASS: u8 = 77;
    /// Client system architecture (RFC 4578).
    pub const ARCH: u8 = 93;
    /// Client machine identifier (UUID/GUID, RFC 4578).
    pub const MACHINE_ID: u8 = 97;
    /// iPXE's encapsulated options.
    pub const IPXE: u8 = 175;
    /// End.
    pub const END: u8 = 255;
    /// Pad.
    pub const PAD: u8 = 0;
}

/// One DHCP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// BOOTREQUEST or BOOTREPLY.
    pub op: u8,
    /// Hardware type (1: Ethernet).
    pub htype: u8,
    /// Hardware address length (6 for Ethernet).
    pub hlen: u8,
    /// Relay hops.
    pub hops: u8,
    /// Transaction id.
    pub xid: u32,
    /// Seconds since the client began.
    pub secs: u16,
    /// Flags (0x8000: reply by broadcast).
    pub flags: u16,
    /// Client address (when it has one).
    pub ciaddr: Ipv4Addr,
    /// Your (the client's) address.
    pub yiaddr: Ipv4Addr,
    /// Next server (TFTP).
    pub siaddr: Ipv4Addr,
    /// Relay agent address.
    pub giaddr: Ipv4Addr,
    /// Client hardware address.
    pub chaddr: [u8; 16],
    /// Server host name.
    pub sname: Vec<u8>,
    /// Boot file name.
    pub file: Vec<u8>,
    /// Options in order, each code once (split options joined).
    pub options: Vec<(u8, Vec<u8>)>,
}

/// Why a datagram is not a DHCP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn ip_at(buf: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3])
}

fn field(bytes: &[u8]) -> Vec<u8> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    bytes[..end].to_vec()
}

impl Message {
    /// Parses one datagram.
    pub fn parse(buf: &[u8]) -> Result<Message, Malformed> {
        if buf.len() < HEADER + 4 {
            return Err(Malformed(format!(
                "{} bytes is too short for DHCP",
                buf.len()
            )));
        }
        if buf[HEADER..HEADER + 4] != MAGIC {
            return Err(Malformed(
                "no DHCP magic cookie (plain BOOTP is not served)".into(),
            ));
        }
        let mut chaddr = [0u8; 16];
        chaddr.copy_from_slice(&buf[28..44]);
        let mut message = Message {
            op: buf[0],
            htype: buf[1],
            hlen: buf[2],
            hops: buf[3],
            xid: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            secs: u16::from_be_bytes([buf[8], buf[9]]),
            flags: u16::from_be_bytes([buf[10], buf[11]]),
            ciaddr: ip_at(buf, 12),
            yiaddr: ip_at(buf, 16),
            siaddr: ip_at(buf, 20),
            giaddr: ip_at(buf, 24),
            chaddr,
            sname: field(&buf[44..108]),
            file: field(&buf[108..236]),
            options: Vec::new(),
        };
        let mut at = HEADER + 4;
        // No END option: accept what came (some clients omit it).
        while let Some(&code) = buf.get(at) {
            match code {
                opt::PAD => at += 1,
                opt::END => break,
                code => {
                    let Some(&len) = buf.get(at + 1) else {
                        return Err(Malformed(format!("option {code} has no length")));
                    };
                    let start = at + 2;
                    let end = start + usize::from(len);
                    let Some(value) = buf.get(start..end) else {
                        return Err(Malformed(format!(
                            "option {code} runs past the end of the packet"
                        )));
                    };
                    match message.options.iter_mut().find(|(c, _)| *c == code) {
                        Some((_, joined)) => joined.extend_from_slice(value),
                        None => message.options.push((code, value.to_vec())),
                    }
                    at = end;
                }
            }
        }
        Ok(message)
    }

    /// The message on the wire (at least 300 bytes, as BOOTP relays expect).
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(576);
        buf.extend_from_slice(&[self.op, self.htype, self.hlen, self.hops]);
        buf.extend_from_slice(&self.xid.to_be_bytes());
        buf.extend_from_slice(&self.secs.to_be_bytes());
        buf.extend_from_slice(&self.flags.to_be_bytes());
        for ip in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            buf.extend_from_slice(&ip.octets());
        }
        buf.extend_from_slice(&self.chaddr);
        let mut fixed = |bytes: &[u8], width: usize| {
            let n = bytes.len().min(width - 1);
            buf.extend_from_slice(&bytes[..n]);
            buf.resize(buf.len() + width - n, 0);
        };
        fixed(&self.sname, 64);
        fixed(&self.file, 128);
        buf.extend_from_slice(&MAGIC);
        for (code, value) in &self.options {
            // Long values are split into several options of one code (RFC 3396).
            for piece in value.chunks(255) {
                buf.push(*code);
                buf.push(piece.len() as u8);
                buf.extend_from_slice(piece);
            }
            if value.is_empty() {
                buf.extend_from_slice(&[*code, 0]);
            }
        }
        buf.push(opt::END);
        if buf.len() < 300 {
            buf.resize(300, 0);
        }
        buf
    }

    /// The value of option `code`.
    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    /// Sets option `code` (replacing an earlier value).
    pub fn set_option(&mut self, code: u8, value: impl Into<Vec<u8>>) {
        let value = value.into();
        match self.options.iter_mut().find(|(c, _)| *c == code) {
            Some((_, old)) => *old = value,
            None => self.options.push((code, value)),
        }
    }

    /// The message type (option 53).
    pub fn kind(&self) -> Option<u8> {
        self.option(opt::MESSAGE_TYPE)
            .and_then(|v| v.first().copied())
    }

    /// The client's Ethernet MAC, normalised (`aa:bb:cc:dd:ee:ff`), when it has one.
    pub fn mac(&self) -> Option<String> {
        (self.htype == 1 && self.hlen == 6).then(|| {
            self.chaddr[..6]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        })
    }

    /// An IPv4 address option.
    pub fn ip_option(&self, code: u8) -> Option<Ipv4Addr> {
        let v = self.option(code)?;
        (v.len() == 4).then(|| Ipv4Addr::new(v[0], v[1], v[2], v[3]))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A DISCOVER as a PXE ROM sends it.
    pub(crate) fn discover(mac: [u8; 6], options: &[(u8, &[u8])]) -> Message {
        let mut chaddr = [0u8; 16];
        chaddr[..6].copy_from_slice(&mac);
        let mut m = Message {
            op: BOOTREQUEST,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid: 0x1234_5678,
            secs: 4,
            flags: 0x8000,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            sname: Vec::new(),
            file: Vec::new(),
            options: vec![(opt::MESSAGE_TYPE, vec![kind::DISCOVER])],
        };
        for (code, value) in options {
            m.set_option(*code, value.to_vec());
        }
        m
    }

    #[test]
    fn messages_survive_a_round_trip() {
        let mut m = discover(
            [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            &[
                (opt::VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"),
                (opt::ARCH, &[0, 0]),
            ],
        );
        m.file = b"undionly.kpxe".to_vec();
        m.set_option(opt::HOSTNAME, vec![b'x'; 300]);
        let wire = m.encode();
        assert!(wire.len() >= 300);
        let back = Message::parse(&wire).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.mac().as_deref(), Some("52:54:00:12:34:56"));
        assert_eq!(back.kind(), Some(kind::DISCOVER));
    }

    #[test]
    fn malformed_datagrams_are_errors_not_panics() {
        let good = discover([1, 2, 3, 4, 5, 6], &[]).encode();
        assert!(Message::parse(&good[..100]).is_err());
        let mut no_cookie = good.clone();
        no_cookie[236] = 0;
        assert!(Message::parse(&no_cookie).is_err());
        let mut runaway = good[..240].to_vec();
        runaway.extend_from_slice(&[53, 200, 1]);
        assert!(Message::parse(&runaway).is_err());
        let mut no_len = good[..240].to_vec();
        no_len.push(53);
        assert!(Message::parse(&no_len).is_err());
        let mut no_end = good[..240].to_vec();
        no_end.extend_from_slice(&[53, 1, 1]);
        assert_eq!(Message::parse(&no_end).unwrap().kind(), Some(1));
    }
}
