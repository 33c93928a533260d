//! The appliance's IPv4 configuration as the kernel command line gives it (`ip=`), parsed
//! here in pure code (host-tested); `net` applies it to the interface.
//!
//! | value                       | meaning                                                  |
//! |-----------------------------|----------------------------------------------------------|
//! | `ip=dhcp`                   | DHCP on the first NIC (the default when a NIC is present) |
//! | `ip=ADDR/PREFIX[,GATEWAY]`  | static address, e.g. `ip=192.168.1.20/24,192.168.1.1`    |
//! | `ip=off`                    | leave the network down                                   |

use core::fmt;

/// An IPv4 address as four octets (kept free of any network stack's types).
pub type Ipv4 = [u8; 4];

/// How the interface gets its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IpConfig {
    /// DHCPv4 client.
    #[default]
    Dhcp,
    /// A fixed address.
    Static(StaticIp),
    /// No networking.
    Off,
}

/// A static IPv4 configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticIp {
    /// The interface address.
    pub address: Ipv4,
    /// Prefix length (1..=32).
    pub prefix: u8,
    /// Default gateway, inside the subnet.
    pub gateway: Option<Ipv4>,
}

/// Parses a dotted-quad IPv4 address (exactly four decimal octets, no leading `+`).
pub fn parse_ipv4(text: &str) -> Option<Ipv4> {
    let mut out = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut out {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The network mask of a prefix length.
pub fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// Whether `a` and `b` are in the same `/prefix` subnet.
pub fn same_subnet(a: Ipv4, b: Ipv4, prefix: u8) -> bool {
    let m = mask(prefix);
    u32::from_be_bytes(a) & m == u32::from_be_bytes(b) & m
}

/// `a.b.c.d`.
#[derive(Clone, Copy, Debug)]
pub struct Dotted(pub Ipv4);

impl fmt::Display for Dotted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

fn usable_host(address: Ipv4, what: &str) -> Result<(), alloc::string::String> {
    let first = address[0];
    if address == [0; 4] || address == [255; 4] || first == 127 || (224..=239).contains(&first) {
        return Err(alloc::format!(
            "{what} {} is not a usable host address",
            Dotted(address)
        ));
    }
    Ok(())
}

/// Parses the value of `ip=`; the error says what is wrong in one line.
pub fn parse_ip(value: &str) -> Result<IpConfig, alloc::string::String> {
    use alloc::format;
    match value {
        "dhcp" => return Ok(IpConfig::Dhcp),
        "off" | "none" => return Ok(IpConfig::Off),
        _ => {}
    }
    let (cidr, gateway) = match value.split_once(',') {
        Some((cidr, gateway)) => (cidr, Some(gateway)),
        None => (value, None),
    };
    let (address, prefix) = cidr
        .split_once('/')
        .ok_or("expected dhcp, off, or ADDR/PREFIX[,GATEWAY], e.g. 192.168.1.20/24,192.168.1.1")?;
    let address = parse_ipv4(address).ok_or(format!("'{address}' is not an IPv4 address"))?;
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| (1..=32).contains(p) && !prefix.starts_with('+'))
        .ok_or(format!("prefix '{prefix}' is not 1..32"))?;
    usable_host(address, "address")?;
    let gateway = match gateway {
        None => None,
        Some(text) => {
            let g = parse_ipv4(text).ok_or(format!("gateway '{text}' is not an IPv4 address"))?;
            usable_host(g, "gateway")?;
            if !same_subnet(address, g, prefix) {
                return Err(format!(
                    "gateway {} is outside {}/{prefix}",
                    Dotted(g),
                    Dotted(address)
                ));
            }
            if g == address {
                return Err(format!("gateway {} is the address itself", Dotted(g)));
            }
            Some(g)
        }
    };
    Ok(IpConfig::Static(StaticIp {
        address,
        prefix,
        gateway,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dhcp_off_and_static() {
        assert_eq!(parse_ip("dhcp"), Ok(IpConfig::Dhcp));
        assert_eq!(parse_ip("off"), Ok(IpConfig::Off));
        assert_eq!(
            parse_ip("10.0.2.15/24,10.0.2.2"),
            Ok(IpConfig::Static(StaticIp {
                address: [10, 0, 2, 15],
                prefix: 24,
                gateway: Some([10, 0, 2, 2])
            }))
        );
        assert_eq!(
            parse_ip("192.168.7.9/32"),
            Ok(IpConfig::Static(StaticIp {
                address: [192, 168, 7, 9],
                prefix: 32,
                gateway: None
            }))
        );
    }

    #[test]
    fn bad_values_say_why() {
        for (bad, why) in [
            ("", "expected dhcp"),
            ("DHCP", "expected dhcp"),
            ("10.0.2.15", "expected dhcp"),
            ("10.0.2/24", "not an IPv4 address"),
            ("10.0.2.256/24", "not an IPv4 address"),
            ("10.0.2.1.5/24", "not an IPv4 address"),
            ("10.0.2.+1/24", "not an IPv4 address"),
            ("10.0.2.15/0", "not 1..32"),
            ("10.0.2.15/33", "not 1..32"),
            ("10.0.2.15/+8", "not 1..32"),
            ("10.0.2.15/", "not 1..32"),
            ("0.0.0.0/8", "not a usable host"),
            ("127.0.0.1/8", "not a usable host"),
            ("224.0.0.1/4", "not a usable host"),
            ("10.0.2.15/24,10.0.3.1", "outside 10.0.2.15/24"),
            ("10.0.2.15/24,10.0.2.15", "the address itself"),
            ("10.0.2.15/24,gw", "not an IPv4 address"),
            ("10.0.2.15/24,", "not an IPv4 address"),
        ] {
            let e = parse_ip(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn subnet_arithmetic() {
        assert_eq!(mask(24), 0xffff_ff00);
        assert_eq!(mask(32), u32::MAX);
        assert_eq!(mask(1), 0x8000_0000);
        assert!(same_subnet([10, 0, 2, 15], [10, 0, 2, 2], 24));
        assert!(!same_subnet([10, 0, 2, 15], [10, 0, 3, 2], 24));
        assert!(same_subnet([10, 0, 2, 15], [10, 0, 3, 2], 16));
        assert_eq!(Dotted([10, 0, 2, 15]).to_string(), "10.0.2.15");
        assert_eq!(parse_ipv4("1.2.3.4"), Some([1, 2, 3, 4]));
        assert_eq!(parse_ipv4("1.2.3.4."), None);
        assert_eq!(parse_ipv4("01.2.3.4"), Some([1, 2, 3, 4]));
    }
}
