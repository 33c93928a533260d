//! The client allow-list of the NBD server, from `nbd.allow=CIDR[,CIDR...]` on the kernel
//! command line: IPv4 networks such as `10.0.0.0/8` or single addresses (`192.168.1.7`,
//! meaning `/32`). A connection from an address outside every network is refused.
//!
//! Parsing is strict so that a typo is reported rather than silently widening access: octets
//! are decimal without leading zeros, the prefix is 0..=32, and an address with bits set
//! past its prefix (`10.1.2.3/8`) is an error (write `10.0.0.0/8`).
//!
//! Without `nbd.allow=`, only hosts on the appliance's own subnet may connect (the network of
//! its address and prefix, static or from DHCP), and nobody while it has no address: see
//! [`allowed`].

use core::fmt;

/// Networks an allow-list holds at most.
pub const MAX_ALLOW: usize = 16;

/// One IPv4 network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (host bits zero).
    pub address: [u8; 4],
    /// The prefix length, 0..=32.
    pub prefix: u8,
}

impl Cidr {
    /// The network mask of the prefix.
    pub fn mask(&self) -> u32 {
        match self.prefix {
            0 => 0,
            p => u32::MAX << (32 - u32::from(p.min(32))),
        }
    }

    /// The network `address` belongs to with prefix length `prefix` (host bits cleared;
    /// prefixes past 32 count as 32).
    pub fn network_of(address: [u8; 4], prefix: u8) -> Cidr {
        let mut cidr = Cidr {
            address,
            prefix: prefix.min(32),
        };
        cidr.address = (u32::from_be_bytes(address) & cidr.mask()).to_be_bytes();
        cidr
    }

    /// True if `address` is in this network.
    pub fn contains(&self, address: [u8; 4]) -> bool {
        u32::from_be_bytes(address) & self.mask() == u32::from_be_bytes(self.address)
    }

    /// Parses `a.b.c.d` or `a.b.c.d/n`.
    pub fn parse(text: &str) -> Result<Cidr, AllowError> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address = parse_ipv4(address).ok_or(AllowError::BadAddress)?;
        let prefix = match prefix {
            None => 32,
            Some(p) => parse_decimal(p, 32).ok_or(AllowError::BadPrefix)? as u8,
        };
        let cidr = Cidr { address, prefix };
        if u32::from_be_bytes(address) & !cidr.mask() != 0 {
            return Err(AllowError::HostBitsSet);
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.address;
        write!(f, "{a}.{b}.{c}.{d}/{}", self.prefix)
    }
}

/// What is wrong with an `nbd.allow=` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowError {
    /// No networks at all.
    Empty,
    /// An empty entry (`a,,b` or a trailing comma).
    EmptyEntry,
    /// Not four decimal octets 0..=255 without leading zeros.
    BadAddress,
    /// The prefix is not a number 0..=32.
    BadPrefix,
    /// The address has bits set past the prefix.
    HostBitsSet,
    /// More than [`MAX_ALLOW`] networks.
    TooMany,
}

impl fmt::Display for AllowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AllowError::Empty => "no networks given (expected e.g. nbd.allow=10.0.0.0/8)",
            AllowError::EmptyEntry => "empty entry in the list",
            AllowError::BadAddress => "bad IPv4 address (expected e.g. 192.168.1.0/24)",
            AllowError::BadPrefix => "bad prefix length (expected /0 to /32)",
            AllowError::HostBitsSet => {
                "address has bits set past the prefix (give the network address)"
            }
            AllowError::TooMany => "too many networks (at most 16)",
        })
    }
}

/// The networks whose hosts may connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AllowList {
    networks: [Option<Cidr>; MAX_ALLOW],
}

impl AllowList {
    /// Allows nobody (what a malformed `nbd.allow=` becomes: fail closed).
    pub const fn nobody() -> AllowList {
        AllowList {
            networks: [None; MAX_ALLOW],
        }
    }

    /// Parses `CIDR[,CIDR...]`.
    pub fn parse(text: &str) -> Result<AllowList, (AllowError, usize)> {
        if text.is_empty() {
            return Err((AllowError::Empty, 0));
        }
        let mut list = AllowList::nobody();
        for (i, entry) in text.split(',').enumerate() {
            if entry.is_empty() {
                return Err((AllowError::EmptyEntry, i));
            }
            let cidr = Cidr::parse(entry).map_err(|e| (e, i))?;
            *list.networks.get_mut(i).ok_or((AllowError::TooMany, i))? = Some(cidr);
        }
        Ok(list)
    }

    /// True if `address` is in one of the networks.
    pub fn allows(&self, address: [u8; 4]) -> bool {
        self.networks().any(|n| n.contains(address))
    }

    /// The networks, in the order given.
    pub fn networks(&self) -> impl Iterator<Item = &Cidr> {
        self.networks.iter().flatten()
    }
}

/// Whether `peer` may connect: with an `nbd.allow=` list, if it is in one of its networks;
/// without one, if it is on the appliance's subnet `local` (its address and prefix), and
/// nobody while the appliance has no address.
pub fn allowed(allow: Option<&AllowList>, local: Option<([u8; 4], u8)>, peer: [u8; 4]) -> bool {
    match (allow, local) {
        (Some(list), _) => list.allows(peer),
        (None, Some((address, prefix))) => Cidr::network_of(address, prefix).contains(peer),
        (None, None) => false,
    }
}

fn parse_ipv4(text: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = text.split('.');
    for octet in out.iter_mut() {
        *octet = parse_decimal(parts.next()?, 255)? as u8;
    }
    parts.next().is_none().then_some(out)
}

/// A decimal number up to `max`: digits only, no sign, no leading zero (except `0`).
fn parse_decimal(text: &str, max: u32) -> Option<u32> {
    if text.is_empty()
        || text.len() > 3
        || !text.bytes().all(|b| b.is_ascii_digit())
        || (text.len() > 1 && text.starts_with('0'))
    {
        return None;
    }
    text.parse::<u32>().ok().filter(|&n| n <= max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_addresses_and_networks() {
        let list = AllowList::parse("192.168.1.7,10.0.0.0/8,172.16.0.0/12").unwrap();
        assert_eq!(list.networks().count(), 3);
        assert!(list.allows([192, 168, 1, 7]));
        assert!(!list.allows([192, 168, 1, 8]));
        assert!(list.allows([10, 255, 3, 4]));
        assert!(list.allows([172, 31, 255, 255]));
        assert!(!list.allows([172, 32, 0, 0]));
        assert!(!list.allows([11, 0, 0, 0]));
        let all = AllowList::parse("0.0.0.0/0").unwrap();
        assert!(all.allows([1, 2, 3, 4]) && all.allows([255, 255, 255, 255]));
        let display: Vec<String> = list.networks().map(|c| c.to_string()).collect();
        assert_eq!(display, ["192.168.1.7/32", "10.0.0.0/8", "172.16.0.0/12"]);
    }

    #[test]
    fn prefix_edges() {
        let c = Cidr::parse("10.0.0.128/25").unwrap();
        assert!(c.contains([10, 0, 0, 128]) && c.contains([10, 0, 0, 255]));
        assert!(!c.contains([10, 0, 0, 127]));
        let c = Cidr::parse("10.0.0.1/32").unwrap();
        assert!(c.contains([10, 0, 0, 1]) && !c.contains([10, 0, 0, 0]));
        assert_eq!(Cidr::parse("128.0.0.0/1").unwrap().mask(), 0x8000_0000);
    }

    #[test]
    fn default_is_the_local_subnet() {
        // QEMU user networking: the appliance is 10.0.2.15/24, forwarded clients come from
        // 10.0.2.2.
        let local = Some(([10, 0, 2, 15], 24));
        assert!(allowed(None, local, [10, 0, 2, 2]));
        assert!(allowed(None, local, [10, 0, 2, 255]));
        assert!(!allowed(None, local, [10, 0, 3, 2]));
        assert!(!allowed(None, local, [192, 168, 7, 1]));
        // No address yet: nobody.
        assert!(!allowed(None, None, [10, 0, 2, 2]));
        // /32 and /0 edges.
        assert!(allowed(None, Some(([10, 1, 1, 1], 32)), [10, 1, 1, 1]));
        assert!(!allowed(None, Some(([10, 1, 1, 1], 32)), [10, 1, 1, 2]));
        assert!(allowed(None, Some(([10, 1, 1, 1], 0)), [8, 8, 8, 8]));
        assert_eq!(
            Cidr::network_of([172, 16, 5, 9], 12).to_string(),
            "172.16.0.0/12"
        );
        // A list replaces the default entirely, also for the local subnet.
        let list = AllowList::parse("192.168.7.0/24").unwrap();
        assert!(!allowed(Some(&list), local, [10, 0, 2, 2]));
        assert!(allowed(Some(&list), local, [192, 168, 7, 40]));
        assert!(!allowed(Some(&AllowList::nobody()), local, [10, 0, 2, 2]));
    }

    #[test]
    fn nobody_allows_nobody() {
        assert!(!AllowList::nobody().allows([127, 0, 0, 1]));
        assert_eq!(AllowList::nobody().networks().count(), 0);
    }

    #[test]
    fn errors() {
        use AllowError::*;
        for (text, error, index) in [
            ("", Empty, 0),
            ("10.0.0.0/8,", EmptyEntry, 1),
            (",10.0.0.0/8", EmptyEntry, 0),
            ("10.0.0.0/8,,1.2.3.4", EmptyEntry, 1),
            ("10.0.0", BadAddress, 0),
            ("10.0.0.0.0", BadAddress, 0),
            ("10.0.0.256", BadAddress, 0),
            ("010.0.0.0", BadAddress, 0),
            ("10.0.0.-1", BadAddress, 0),
            ("10.0.0.+1", BadAddress, 0),
            ("a.b.c.d", BadAddress, 0),
            ("1.2.3.4, 5.6.7.8", BadAddress, 1),
            ("::1", BadAddress, 0),
            ("10.0.0.0/33", BadPrefix, 0),
            ("10.0.0.0/", BadPrefix, 0),
            ("10.0.0.0/08", BadPrefix, 0),
            ("10.0.0.0/8/8", BadPrefix, 0),
            ("10.1.2.3/8", HostBitsSet, 0),
            ("1.2.3.4/0", HostBitsSet, 0),
        ] {
            assert_eq!(AllowList::parse(text), Err((error, index)), "{text:?}");
        }
        let many = vec!["1.1.1.1"; MAX_ALLOW + 1].join(",");
        assert_eq!(AllowList::parse(&many), Err((TooMany, MAX_ALLOW)));
        let max = vec!["1.1.1.1"; MAX_ALLOW].join(",");
        assert!(AllowList::parse(&max).is_ok());
    }
}
