//! Kernel command-line parsing.
//!
//! The boot loader hands over one string. Its first token is the image itself: QEMU `-kernel`
//! passes the file name, iPXE the URL, GRUB the path. Options follow, separated by whitespace:
//!
//! | option                     | meaning                                                 |
//! |----------------------------|---------------------------------------------------------|
//! | `console=ttyS<n>[,<baud>]` | serial console on COM1..COM4 (`n` = 0..3), standard baud |
//! | `loglevel=<level>`         | `error`, `warn`, `info`, `debug` or `trace`             |
//! | `testing[=1\|0]`           | enable test-only commands and exit via `isa-debug-exit` |
//! | `ip=dhcp\|off\|ADDR/PREFIX[,GW]` | IPv4 configuration of the NIC (see [`crate::ipconfig`]) |
//! | `nbd.port=<port>`          | TCP port of the NBD server (default 10809)              |
//! | `nbd.allow=<cidr>[,...]`   | IPv4 networks allowed to connect to the NBD server (default: the NIC's subnet) |
//! | `nbd.idle=<seconds>`       | close NBD sessions idle this long (default, or 0: never) |
//!
//! Nothing here is fatal: unknown options are collected in [`CmdLine::unknown`] and malformed
//! values in [`CmdLine::errors`]; the kernel logs both (see [`CmdLine::warnings`]) and boots with
//! defaults. A repeated option overrides the earlier one, as on Linux. One exception fails
//! closed: a malformed `nbd.allow=` allows nobody (a typo must not open the disks to all).
//!
//! To add an option, add a typed field to [`CmdLine`] and a row to `OPTIONS`.
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

pub use log::LevelFilter;

use crate::ipconfig::IpConfig;
use nbd::AllowList;

/// Baud rates accepted in `console=ttyS<n>,<baud>` (the divisors of the 16550's 115200 clock
/// that terminals commonly offer).
pub const STANDARD_BAUD_RATES: [u32; 10] = [
    300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200,
];

/// The baud rate used when `console=` names no rate.
pub const DEFAULT_BAUD: u32 = 115200;

/// The serial console selected by `console=ttyS<port>[,<baud>]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// Serial port index: 0..=3 for ttyS0..ttyS3 (COM1..COM4).
    pub port: u8,
    /// The requested baud rate, if one was given (one of [`STANDARD_BAUD_RATES`]).
    pub baud: Option<u32>,
}

impl ConsoleConfig {
    /// The legacy I/O port base of this UART (COM1 0x3F8, COM2 0x2F8, COM3 0x3E8, COM4 0x2E8).
    pub fn io_base(&self) -> u16 {
        match self.port {
            0 => 0x3f8,
            1 => 0x2f8,
            2 => 0x3e8,
            _ => 0x2e8,
        }
    }

    /// The baud rate to program: the requested one or [`DEFAULT_BAUD`].
    pub fn baud_or_default(&self) -> u32 {
        self.baud.unwrap_or(DEFAULT_BAUD)
    }
}

/// A known option with a value that could not be used (the option is then ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdLineError {
    /// The whole token as given, e.g. `console=ttyS9`.
    pub token: String,
    /// What was wrong, e.g. `unknown serial port (expected ttyS0..ttyS3)`.
    pub reason: String,
}

impl fmt::Display for CmdLineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ignoring '{}': {}", self.token, self.reason)
    }
}

/// The parsed kernel command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CmdLine {
    /// The command line exactly as the boot loader passed it (for the `cmdline` command).
    pub raw: String,
    /// The first token (image name, path or URL), if the loader passed one.
    pub image: Option<String>,
    /// `console=`: the serial console, if given.
    pub console: Option<ConsoleConfig>,
    /// `loglevel=`: the log level, if given.
    pub loglevel: Option<LevelFilter>,
    /// `testing`: test-only commands and exit via `isa-debug-exit` are enabled.
    pub testing: bool,
    /// `ip=`: the IPv4 configuration, if given (the network defaults to DHCP).
    pub ip: Option<IpConfig>,
    /// `nbd.port=`: the NBD server's TCP port, if given.
    pub nbd_port: Option<u16>,
    /// `nbd.allow=`: the networks allowed to use the NBD server, if given (`None`: only the
    /// NIC's own subnet; a malformed value gives an empty list, which allows nobody).
    pub nbd_allow: Option<AllowList>,
    /// `nbd.idle=`: seconds after which an NBD session with no request and nothing in flight
    /// is closed (`None`, or `nbd.idle=0`: never).
    pub nbd_idle: Option<u32>,
    /// Options nobody knows, as given (ignored).
    pub unknown: Vec<String>,
    /// Known options with malformed values (ignored).
    pub errors: Vec<CmdLineError>,
}

/// Applies one option's value (`None` for a bare `name`) or explains what is wrong with it.
type Handler = fn(&mut CmdLine, Option<&str>) -> Result<(), String>;

/// The options we understand: name and handler.
const OPTIONS: &[(&str, Handler)] = &[
    ("console", parse_console),
    ("loglevel", parse_loglevel),
    ("testing", parse_testing),
    ("ip", parse_ip_option),
    ("nbd.port", parse_nbd_port),
    ("nbd.allow", parse_nbd_allow),
    ("nbd.idle", parse_nbd_idle),
];

fn find_option(name: &str) -> Option<Handler> {
    OPTIONS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, handler)| *handler)
}

/// Splits `name=value` (value may be empty) or a bare `name`.
fn split_option(token: &str) -> (&str, Option<&str>) {
    match token.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (token, None),
    }
}

impl CmdLine {
    /// Parses the command line the boot loader passed. Never fails: problems are recorded in
    /// `unknown` and `errors`.
    ///
    /// The first token is taken as the image name and skipped, unless it is itself a known
    /// option: some loaders (PVH, a bare `-append`) pass only the options.
    pub fn parse(raw: &str) -> CmdLine {
        let mut cmdline = CmdLine {
            raw: raw.to_string(),
            ..CmdLine::default()
        };
        let mut tokens = raw.split_ascii_whitespace().peekable();
        if let Some(first) = tokens.peek() {
            if find_option(split_option(first).0).is_none() {
                cmdline.image = Some(first.to_string());
                tokens.next();
            }
        }
        for token in tokens {
            let (name, value) = split_option(token);
            match find_option(name) {
                Some(handler) => {
                    if let Err(reason) = handler(&mut cmdline, value) {
                        cmdline.errors.push(CmdLineError {
                            token: token.to_string(),
                            reason,
                        });
                    }
                }
                None => cmdline.unknown.push(token.to_string()),
            }
        }
        cmdline
    }

    /// One line per problem, for the kernel to log as warnings.
    pub fn warnings(&self) -> impl Iterator<Item = String> + '_ {
        let unknown = self
            .unknown
            .iter()
            .map(|token| format!("ignoring unknown option '{token}'"));
        unknown.chain(self.errors.iter().map(|e| e.to_string()))
    }
}

fn parse_console(cmdline: &mut CmdLine, value: Option<&str>) -> Result<(), String> {
    let value = value.ok_or("needs a value, e.g. console=ttyS0,115200")?;
    let (device, baud) = match value.split_once(',') {
        Some((device, baud)) => (device, Some(baud)),
        None => (value, None),
    };
    let port = match device {
        "ttyS0" => 0,
        "ttyS1" => 1,
        "ttyS2" => 2,
        "ttyS3" => 3,
        _ => return Err("unknown serial port (expected ttyS0..ttyS3)".to_string()),
    };
    let baud = match baud {
        None => None,
        Some(text) => {
            // Accept Linux's `115200n8` spelling; 8N1 is the only framing we drive.
            let digits = text.strip_suffix("n8").unwrap_or(text);
            let rate = digits
                .parse::<u32>()
                .ok()
                .filter(|rate| STANDARD_BAUD_RATES.contains(rate))
                .ok_or_else(|| {
                    format!("unsupported baud rate '{text}' (expected e.g. 9600 or 115200)")
                })?;
            Some(rate)
        }
    };
    cmdline.console = Some(ConsoleConfig { port, baud });
    Ok(())
}

fn parse_loglevel(cmdline: &mut CmdLine, value: Option<&str>) -> Result<(), String> {
    let level = match value {
        Some("error") => LevelFilter::Error,
        Some("warn") => LevelFilter::Warn,
        Some("info") => LevelFilter::Info,
        Some("debug") => LevelFilter::Debug,
        Some("trace") => LevelFilter::Trace,
        _ => return Err("expected error, warn, info, debug or trace".to_string()),
    };
    cmdline.loglevel = Some(level);
    Ok(())
}

fn parse_testing(cmdline: &mut CmdLine, value: Option<&str>) -> Result<(), String> {
    cmdline.testing = match value {
        None | Some("1") | Some("yes") | Some("on") | Some("true") => true,
        Some("0") | Some("no") | Some("off") | Some("false") => false,
        Some(_) => return Err("expected testing, testing=1 or testing=0".to_string()),
    };
    Ok(())
}

fn parse_ip_option(cmdline: &mut CmdLine, value: Option<&str>) -> Result<(), String> {
    let value = value.ok_or("needs a value: ip=dhcp, ip=off or ip=ADDR/PREFIX[,GATEWAY]")?;
    cmdline.ip = Some(crate::ipconfig::parse_ip(value)?);
    Ok(())
}

fn parse_nbd_port(cmdline: &mut CmdLine, value: Option<&str>) -> Result<(), String> {
    let port = value
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u16>().ok())
        .filter(|&p| p != 0)
        .ok_or("expected a TCP port 1..65535, e.g. nbd.port=10809")?;
    cmdline.nbd_port = Some(port);
    Ok(())
}

/// The longest `nbd.idle=`: a week.
pub const NBD_IDLE_MAX: u32 = 7 * 24 * 3600;

fn parse_nbd_idle(cmdline: &mut CmdLine, value: Option<&str>) -> Result<(), String> {
    let seconds = value
        .filter(|v| !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&s| s <= NBD_IDLE_MAX)
        .ok_or_else(|| {
            format!("expected seconds 0..{NBD_IDLE_MAX} (0: never), e.g. nbd.idle=600")
        })?;
    cmdline.nbd_idle = (seconds > 0).then_some(seconds);
    Ok(())
}

fn parse_nbd_allow(cmdline: &mut CmdLine, value: Option<&str>) -> Result<(), String> {
    match AllowList::parse(value.unwrap_or("")) {
        Ok(list) => {
            cmdline.nbd_allow = Some(list);
            Ok(())
        }
        Err((error, index)) => {
            cmdline.nbd_allow = Some(AllowList::nobody());
            Err(format!(
                "entry {}: {error}; NBD clients are refused until this is fixed",
                index + 1
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_image_only() {
        let c = CmdLine::parse("");
        assert_eq!(c, CmdLine::default());
        let c = CmdLine::parse("   ");
        assert_eq!(c.image, None);
        assert_eq!(c.raw, "   ");
        let c = CmdLine::parse("snapfw.elf");
        assert_eq!(c.image.as_deref(), Some("snapfw.elf"));
        assert!(c.unknown.is_empty() && c.errors.is_empty());
    }

    #[test]
    fn skips_image_name_qemu_ipxe_grub() {
        for image in [
            "target/x86_64-unknown-none/release/snapfw",
            "http://10.0.2.2/snapfw?x=1",
            "tftp://10.0.2.2/snapfw",
            "/boot/snapfw",
        ] {
            let raw = format!("{image} console=ttyS0 testing");
            let c = CmdLine::parse(&raw);
            assert_eq!(c.image.as_deref(), Some(image));
            assert_eq!(c.raw, raw);
            assert_eq!(
                c.console,
                Some(ConsoleConfig {
                    port: 0,
                    baud: None
                })
            );
            assert!(c.testing);
            assert!(c.unknown.is_empty(), "{:?}", c.unknown);
        }
    }

    #[test]
    fn options_without_image_name() {
        let c = CmdLine::parse("console=ttyS1,9600 loglevel=debug");
        assert_eq!(c.image, None);
        assert_eq!(
            c.console,
            Some(ConsoleConfig {
                port: 1,
                baud: Some(9600)
            })
        );
        assert_eq!(c.loglevel, Some(LevelFilter::Debug));
        let c = CmdLine::parse("testing");
        assert_eq!(c.image, None);
        assert!(c.testing);
    }

    #[test]
    fn console_ports_and_bauds() {
        for (n, base) in [(0u8, 0x3f8u16), (1, 0x2f8), (2, 0x3e8), (3, 0x2e8)] {
            let c = CmdLine::parse(&format!("k console=ttyS{n},115200"));
            let console = c.console.expect("console");
            assert_eq!(console.port, n);
            assert_eq!(console.io_base(), base);
            assert_eq!(console.baud_or_default(), 115200);
        }
        let c = CmdLine::parse("k console=ttyS0,115200n8");
        assert_eq!(c.console.map(|c| c.baud), Some(Some(115200)));
        assert!(c.errors.is_empty());
        let c = CmdLine::parse("k console=ttyS0");
        assert_eq!(c.console.map(|c| c.baud_or_default()), Some(DEFAULT_BAUD));
    }

    #[test]
    fn console_errors() {
        for bad in [
            "console",
            "console=",
            "console=ttyS4",
            "console=tty0",
            "console=ttyS0,",
            "console=ttyS0,0",
            "console=ttyS0,12345",
            "console=ttyS0,-9600",
            "console=ttyS0,115200e7",
            "console=ttyS0,99999999999999999999",
            "console=ttyS0,9600,8",
        ] {
            let c = CmdLine::parse(&format!("k {bad}"));
            assert_eq!(c.console, None, "{bad}");
            assert_eq!(c.errors.len(), 1, "{bad}");
            assert_eq!(c.errors[0].token, bad);
            assert!(c.unknown.is_empty());
        }
        let c = CmdLine::parse("k console=ttyS7");
        assert_eq!(
            c.errors[0].to_string(),
            "ignoring 'console=ttyS7': unknown serial port (expected ttyS0..ttyS3)"
        );
    }

    #[test]
    fn loglevels() {
        for (name, level) in [
            ("error", LevelFilter::Error),
            ("warn", LevelFilter::Warn),
            ("info", LevelFilter::Info),
            ("debug", LevelFilter::Debug),
            ("trace", LevelFilter::Trace),
        ] {
            let c = CmdLine::parse(&format!("k loglevel={name}"));
            assert_eq!(c.loglevel, Some(level));
        }
        for bad in ["loglevel", "loglevel=", "loglevel=7", "loglevel=INFO"] {
            let c = CmdLine::parse(&format!("k {bad}"));
            assert_eq!(c.loglevel, None);
            assert_eq!(c.errors.len(), 1, "{bad}");
        }
    }

    #[test]
    fn testing_flag() {
        assert!(!CmdLine::parse("k").testing);
        assert!(CmdLine::parse("k testing").testing);
        assert!(CmdLine::parse("k testing=1").testing);
        assert!(!CmdLine::parse("k testing=0").testing);
        assert!(!CmdLine::parse("k testing testing=0").testing);
        let c = CmdLine::parse("k testing=maybe");
        assert!(!c.testing);
        assert_eq!(c.errors.len(), 1);
    }

    #[test]
    fn ip_option() {
        assert_eq!(CmdLine::parse("k").ip, None);
        let c = CmdLine::parse("k ip=10.0.2.15/24,10.0.2.2");
        assert!(matches!(c.ip, Some(IpConfig::Static(s)) if s.prefix == 24));
        let c = CmdLine::parse("k ip=off");
        assert_eq!(c.ip, Some(IpConfig::Off));
        for bad in ["ip", "ip=", "ip=10.0.2.15", "ip=10.0.2.15/24,10.1.0.1"] {
            let c = CmdLine::parse(&format!("k {bad}"));
            assert_eq!(c.ip, None, "{bad}");
            assert_eq!(c.errors.len(), 1, "{bad}");
        }
    }

    #[test]
    fn last_option_wins() {
        let c = CmdLine::parse("k loglevel=info loglevel=trace console=ttyS0 console=ttyS2");
        assert_eq!(c.loglevel, Some(LevelFilter::Trace));
        assert_eq!(c.console.map(|c| c.port), Some(2));
    }

    #[test]
    fn unknown_options_are_collected_not_fatal() {
        let c = CmdLine::parse("k quiet ip=dhcp loglevel=warn nbd.prot=10809 =x");
        assert_eq!(c.unknown, ["quiet", "nbd.prot=10809", "=x"]);
        assert_eq!(c.loglevel, Some(LevelFilter::Warn));
        assert_eq!(c.ip, Some(IpConfig::Dhcp));
        let warnings: Vec<String> = c.warnings().collect();
        assert_eq!(warnings.len(), 3);
        assert_eq!(warnings[0], "ignoring unknown option 'quiet'");
    }

    #[test]
    fn warnings_list_unknown_then_errors() {
        let c = CmdLine::parse("k\tfoo\nloglevel=loud  ");
        let warnings: Vec<String> = c.warnings().collect();
        assert_eq!(
            warnings,
            [
                "ignoring unknown option 'foo'",
                "ignoring 'loglevel=loud': expected error, warn, info, debug or trace",
            ]
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..2000 {
            let mut s = String::new();
            for _ in 0..(seed % 40) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let pool = b"console=ttyS0,1152 \t=loglevel.testing\x00\xff";
                let c = pool[(seed % pool.len() as u64) as usize];
                s.push(c as char);
            }
            let c = CmdLine::parse(&s);
            assert_eq!(c.raw, s);
            let _ = c.warnings().count();
        }
    }

    #[test]
    fn nbd_port() {
        assert_eq!(CmdLine::parse("k").nbd_port, None);
        assert_eq!(CmdLine::parse("k nbd.port=10809").nbd_port, Some(10809));
        assert_eq!(
            CmdLine::parse("k nbd.port=1 nbd.port=65535").nbd_port,
            Some(65535)
        );
        for bad in [
            "nbd.port",
            "nbd.port=",
            "nbd.port=0",
            "nbd.port=65536",
            "nbd.port=-1",
            "nbd.port=+80",
            "nbd.port=80a",
            "nbd.port=99999999999999999999",
        ] {
            let c = CmdLine::parse(&format!("k {bad}"));
            assert_eq!(c.nbd_port, None, "{bad}");
            assert_eq!(c.errors.len(), 1, "{bad}");
        }
    }

    #[test]
    fn nbd_idle() {
        assert_eq!(CmdLine::parse("k").nbd_idle, None);
        assert_eq!(CmdLine::parse("k nbd.idle=600").nbd_idle, Some(600));
        assert_eq!(CmdLine::parse("k nbd.idle=600 nbd.idle=0").nbd_idle, None);
        assert_eq!(
            CmdLine::parse("k nbd.idle=604800").nbd_idle,
            Some(NBD_IDLE_MAX)
        );
        for bad in [
            "nbd.idle",
            "nbd.idle=",
            "nbd.idle=-1",
            "nbd.idle=10s",
            "nbd.idle=604801",
            "nbd.idle=99999999999999999999",
        ] {
            let c = CmdLine::parse(&format!("k {bad}"));
            assert_eq!(c.nbd_idle, None, "{bad}");
            assert_eq!(c.errors.len(), 1, "{bad}");
        }
    }

    #[test]
    fn nbd_allow() {
        assert_eq!(CmdLine::parse("k").nbd_allow, None);
        let c = CmdLine::parse("k nbd.allow=10.0.0.0/8,192.168.1.7");
        let list = c.nbd_allow.expect("list");
        assert!(list.allows([10, 1, 2, 3]) && list.allows([192, 168, 1, 7]));
        assert!(!list.allows([192, 168, 1, 8]));
        assert!(c.errors.is_empty());
    }

    #[test]
    fn bad_nbd_allow_fails_closed() {
        for bad in [
            "nbd.allow",
            "nbd.allow=",
            "nbd.allow=10.0.0.0/8,10.1.2.3/8",
            "nbd.allow=any",
        ] {
            let c = CmdLine::parse(&format!("k {bad}"));
            let list = c.nbd_allow.expect("an empty list, not no list");
            assert_eq!(list.networks().count(), 0, "{bad}");
            assert!(!list.allows([10, 1, 2, 3]));
            assert_eq!(c.errors.len(), 1, "{bad}");
        }
        // A later good value wins, as for every option.
        let c = CmdLine::parse("k nbd.allow=x nbd.allow=10.0.0.0/8");
        assert!(c.nbd_allow.expect("list").allows([10, 0, 0, 1]));
        let c = CmdLine::parse("k nbd.allow=10.1.2.3/8");
        assert_eq!(
            c.errors[0].to_string(),
            "ignoring 'nbd.allow=10.1.2.3/8': entry 1: address has bits set past the prefix \
             (give the network address); NBD clients are refused until this is fixed"
        );
    }
}
