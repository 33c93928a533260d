//! The console's command vocabulary: names, usage lines, help texts and argument specs, and
//! the first step of running a line (tokenize, find the command, check its arguments).
//! Pure logic, tested on the host; the kernel's `shell` module executes the result.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::console::args::{tokenize, ArgError, Args, CommandSpec, OptSpec};

/// Which command a line names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandId {
    /// `help [COMMAND]`
    Help,
    /// `version [--json]`
    Version,
    /// `uptime [--json]`
    Uptime,
    /// `date [--json]`
    Date,
    /// `mem [--json]`
    Mem,
    /// `prof start [--hz N] | stop | show [--top N]`
    Prof,
    /// `cmdline [--json]`
    Cmdline,
    /// `log level [LEVEL]`
    Log,
    /// `reboot`
    Reboot,
    /// `poweroff`
    Poweroff,
    /// `crash fault|panic` (test builds only)
    Crash,
    /// `devices [--json]`
    Devices,
    /// `read DEV LBA [COUNT]`
    Read,
    /// `write DEV LBA COUNT (--byte 0xNN | --seed N)`
    Write,
    /// `checksum DEV [LBA COUNT]`
    Checksum,
    /// `flush DEV`
    Flush,
    /// `bench DEV --rw MODE ...`
    Bench,
    /// `snapshot create|list|status|delete|attach|merge ...`
    Snapshot,
    /// `net [echo PORT]`
    Net,
    /// `nbd [--json]`
    Nbd,
    /// `nbd-selftest VOLUME` (test builds only)
    NbdSelfTest,
}

/// One command's description.
#[derive(Debug)]
pub struct CommandInfo {
    /// What runs.
    pub id: CommandId,
    /// The word that names it.
    pub name: &'static str,
    /// Usage line.
    pub usage: &'static str,
    /// One-line summary for `help`.
    pub summary: &'static str,
    /// Longer help for `help COMMAND`.
    pub details: &'static str,
    /// Options and positional arguments.
    pub spec: CommandSpec,
    /// Only available when booted with `testing`.
    pub test_only: bool,
}

const JSON: &[OptSpec] = &[OptSpec::flag("json")];

/// Every command, in the order `help` lists them.
pub static COMMANDS: &[CommandInfo] = &[
    CommandInfo {
        id: CommandId::Help,
        name: "help",
        usage: "help [COMMAND]",
        summary: "list commands, or show one command's usage",
        details: "Without an argument, lists every command with a summary.",
        spec: CommandSpec {
            options: &[],
            required: &[],
            optional: &["COMMAND"],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Version,
        name: "version",
        usage: "version [--json]",
        summary: "firmware name, version, git commit and build profile",
        details: "",
        spec: CommandSpec {
            options: JSON,
            required: &[],
            optional: &[],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Uptime,
        name: "uptime",
        usage: "uptime [--json]",
        summary: "time since boot",
        details: "",
        spec: CommandSpec {
            options: JSON,
            required: &[],
            optional: &[],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Date,
        name: "date",
        usage: "date [--json]",
        summary: "wall-clock time (UTC, ISO 8601) from the real-time clock read at boot",
        details: "Snapshots record their creation time from it. The RTC is taken to keep UTC, as hypervisors (QEMU -rtc base=utc, the default) and servers do.",
        spec: CommandSpec {
            options: JSON,
            required: &[],
            optional: &[],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Mem,
        name: "mem",
        usage: "mem [--json]",
        summary: "heap and physical frames: total, used, free; heap allocations since boot",
        details: "The allocation counter proves the I/O path allocates nothing after start-up.",
        spec: CommandSpec {
            options: JSON,
            required: &[],
            optional: &[],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Prof,
        name: "prof",
        usage: "prof start [--hz N] | stop | show [--top N]",
        summary: "sample where the CPU spends its time (timer-driven profiler)",
        details: "start samples the interrupted instruction N times a second (default 4000, \
                  100 to 20000, a multiple of 100; the timer runs that fast until stop); show prints the run's \
                  counts and its most frequent addresses (default 40) for scripts/prof-symbols.",
        spec: CommandSpec {
            options: &[OptSpec::value("hz"), OptSpec::value("top")],
            required: &["ACTION"],
            optional: &[],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Cmdline,
        name: "cmdline",
        usage: "cmdline [--json]",
        summary: "the kernel command line and how it was understood",
        details: "Options: console=ttyS0[,BAUD] loglevel=error|warn|info|debug|trace testing ip=dhcp|off|ADDR/PREFIX[,GATEWAY]",
        spec: CommandSpec {
            options: JSON,
            required: &[],
            optional: &[],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Log,
        name: "log",
        usage: "log level [error|warn|info|debug|trace]",
        summary: "show or set the log level",
        details: "",
        spec: CommandSpec {
            options: &[],
            required: &["level"],
            optional: &["LEVEL"],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Devices,
        name: "devices",
        usage: "devices [--json]",
        summary: "block devices: model, serial, size, queues, write cache, vectors, counters",
        details: "Devices that failed to initialise are listed with the reason.",
        spec: CommandSpec { options: JSON, required: &[], optional: &[] },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Read,
        name: "read",
        usage: "read DEV LBA [COUNT]",
        summary: "hexdump COUNT blocks (default 1, at most 8) from LBA",
        details: "Use checksum for larger ranges. (testing: --unchecked sends a range past the end to the device)",
        spec: CommandSpec {
            options: &[OptSpec::flag("unchecked")],
            required: &["DEV", "LBA"],
            optional: &["COUNT"],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Write,
        name: "write",
        usage: "write DEV LBA COUNT (--byte 0xNN | --seed N) [--bs SIZE] [--fua] [--flush-every BLOCKS]",
        summary: "write COUNT blocks of a byte value or a seeded pattern, then flush",
        details: "--seed fills each 512-byte sector from its seed and position (see README); --bs sets the transfer size (default: the largest); --fua writes with Force Unit Access; --flush-every flushes after every BLOCKS blocks and prints what is durable.",
        spec: CommandSpec {
            options: &[
                OptSpec::value("byte"),
                OptSpec::value("seed"),
                OptSpec::value("bs"),
                OptSpec::flag("fua"),
                OptSpec::value("flush-every"),
            ],
            required: &["DEV", "LBA", "COUNT"],
            optional: &[],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Checksum,
        name: "checksum",
        usage: "checksum DEV [LBA COUNT]",
        summary: "SHA-256 of a block range (the whole device by default)",
        details: "",
        spec: CommandSpec { options: &[], required: &["DEV"], optional: &["LBA", "COUNT"] },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Flush,
        name: "flush",
        usage: "flush DEV",
        summary: "flush the device's volatile write cache",
        details: "",
        spec: CommandSpec { options: &[], required: &["DEV"], optional: &[] },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Bench,
        name: "bench",
        usage: "bench DEV --rw read|write|randread|randwrite [--bs 4k] [--qd 32] [--time 10s | --ios N] [--size SIZE] [--seed N] [--norandommap] [--fsync N]",
        summary: "fio-like benchmark: IOPS, MB/s, latency percentiles, interrupts per I/O",
        details: "Write modes overwrite the device. Default 10 s; Ctrl-C stops early. --size limits the I/O to the first SIZE bytes (as fio's size). Random modes touch every block once before any repeats, as fio's random map; --norandommap draws each offset independently. --fsync N (write modes, as fio's fsync) waits for the writes in flight and flushes the device after every N writes; the report adds the flush count and latency.",
        spec: CommandSpec {
            options: &[
                OptSpec::value("rw"),
                OptSpec::value("bs"),
                OptSpec::value("qd"),
                OptSpec::value("time"),
                OptSpec::value("ios"),
                OptSpec::value("seed"),
                OptSpec::value("size"),
                OptSpec::flag("norandommap"),
                OptSpec::value("fsync"),
            ],
            required: &["DEV"],
            optional: &[],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Snapshot,
        name: "snapshot",
        usage: "snapshot create NAME ORIGIN COW[:START+LEN] [--chunk 4k] [--writable] | list [--json] | status NAME | delete NAME | attach NAME ORIGIN COW [--no-write] | merge NAME | rename OLD NEW | set NAME --readonly|--writable | extend NAME +SIZE|SIZE | autoextend NAME --threshold PCT --by PCT|SIZE|--off | forget-merge DEV",
        summary: "create, list, show, delete, attach and merge copy-on-write snapshots (dm-snapshot format)",
        details: "COW is a device or a region of one in blocks (vdb:2048+65536). Chunk sizes 4k..512k (default 4k). Snapshot names work with read, write, checksum, flush and bench. merge NAME rolls the origin back to the snapshot (lvconvert --merge): the origin stays online and reads as the snapshot at once, the snapshot is removed when done, a reboot resumes it; Ctrl-C leaves it running. attach adopts a store whose origin is not found by itself (made by Linux, or an ambiguous origin) and writes its binding so it comes back after a reboot; --no-write attaches it read-only until reboot and leaves the store as it is. rename and set rewrite the store's binding (one sector: a power cut leaves the old or the new one); set --readonly refuses writes from the console and NBD from the next request on. extend grows a store into free space after its region, or into its device's new capacity (a whole-device store), by whole chunks. autoextend (off by default, kept in the store) extends a store by --by (a percentage of its size, or a size) whenever its usage reaches --threshold, as far as free space allows, and says so on the console. An origin found half-merged without its store is read-only until the store is attached; forget-merge DEV gives up on a store that is lost for good: DEV becomes writable as it is, its first block zeroed (its first chunk was in the lost store).",
        spec: CommandSpec {
            options: &[OptSpec::value("chunk"), OptSpec::flag("writable"),
                OptSpec::flag("json"),
                OptSpec::flag("no-write"),
                OptSpec::flag("readonly"),
                OptSpec::value("threshold"),
                OptSpec::value("by"),
                OptSpec::flag("off"),
            ],
            required: &["SUBCOMMAND"],
            optional: &["NAME", "ORIGIN", "COW"],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Net,
        name: "net",
        usage: "net [echo PORT]",
        summary: "network: MAC, link, address, gateway, DHCP, counters, TCP listeners and connections",
        details: "The address comes from ip= on the command line (DHCP by default). (testing: 'net echo PORT' starts a TCP echo service)",
        spec: CommandSpec {
            options: &[],
            required: &[],
            optional: &["SUBCOMMAND", "PORT"],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Nbd,
        name: "nbd",
        usage: "nbd [--json]",
        summary: "NBD server: port, allow-list, exports, connected clients and their counters",
        details: "Every volume is an export (qemu-img info nbd://HOST:10809/vda). Port from nbd.port= (default 10809); clients from nbd.allow= (default: the NIC's subnet).",
        spec: CommandSpec {
            options: JSON,
            required: &[],
            optional: &[],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Reboot,
        name: "reboot",
        usage: "reboot",
        summary: "reset the appliance",
        details: "",
        spec: CommandSpec {
            options: &[],
            required: &[],
            optional: &[],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Poweroff,
        name: "poweroff",
        usage: "poweroff",
        summary: "power the appliance off (ACPI S5)",
        details: "",
        spec: CommandSpec {
            options: &[],
            required: &[],
            optional: &[],
        },
        test_only: false,
    },
    CommandInfo {
        id: CommandId::Crash,
        name: "crash",
        usage: "crash fault|panic",
        summary: "(testing) raise a CPU exception or a kernel panic",
        details: "Only with `testing` on the command line.",
        spec: CommandSpec {
            options: &[],
            required: &["KIND"],
            optional: &[],
        },
        test_only: true,
    },
    CommandInfo {
        id: CommandId::NbdSelfTest,
        name: "nbd-selftest",
        usage: "nbd-selftest VOLUME",
        summary: "(testing) run a scripted NBD client against the NBD server on VOLUME",
        details: "Writes 768 KiB at 1 MiB (FUA), flushes, reads it back, sends a bad read and \
                  disconnects, through the NBD server's real sessions. Only with `testing`.",
        spec: CommandSpec {
            options: &[],
            required: &["VOLUME"],
            optional: &[],
        },
        test_only: true,
    },
];

/// Finds a command by name.
pub fn find(name: &str, testing: bool) -> Option<&'static CommandInfo> {
    COMMANDS
        .iter()
        .find(|c| c.name == name && (testing || !c.test_only))
}

/// Why a line could not be turned into a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineError {
    /// The first word is no command.
    UnknownCommand(String),
    /// The arguments do not fit the command.
    BadArguments(&'static str, ArgError),
    /// The line could not be split into words.
    Syntax(ArgError),
}

impl core::fmt::Display for LineError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LineError::UnknownCommand(name) => {
                let shown: String = name
                    .chars()
                    .take(32)
                    .map(|c| if c.is_ascii_graphic() { c } else { '?' })
                    .collect();
                write!(f, "unknown command '{shown}' (type 'help' for the list)")
            }
            LineError::BadArguments(usage, e) => write!(f, "{e} (usage: {usage})"),
            LineError::Syntax(e) => write!(f, "{e}"),
        }
    }
}

/// A line split into its command and words.
pub struct ParsedLine {
    /// The command.
    pub info: &'static CommandInfo,
    /// The words after the command name.
    pub words: Vec<String>,
}

impl ParsedLine {
    /// The arguments checked against the command's spec (always succeeds after `parse_line`).
    pub fn args(&self) -> Result<Args<'_>, LineError> {
        Args::parse(&self.words, &self.info.spec)
            .map_err(|e| LineError::BadArguments(self.info.usage, e))
    }
}

/// Splits `line` and finds its command; `Ok(None)` for an empty line.
pub fn parse_line(line: &str, testing: bool) -> Result<Option<ParsedLine>, LineError> {
    let words = tokenize(line).map_err(LineError::Syntax)?;
    let Some((name, rest)) = words.split_first() else {
        return Ok(None);
    };
    let info = find(name, testing).ok_or_else(|| LineError::UnknownCommand(name.to_string()))?;
    let parsed = ParsedLine {
        info,
        words: rest.to_vec(),
    };
    parsed.args()?;
    Ok(Some(parsed))
}

/// The `help` text: every command's usage and summary.
pub fn help_all(testing: bool) -> String {
    let mut out = String::from("Commands:\n");
    for c in COMMANDS.iter().filter(|c| testing || !c.test_only) {
        out.push_str(&format!("  {:<44} {}\n", c.usage, c.summary));
    }
    out.push_str(
        "Type 'help COMMAND' for one command. Lines can be edited; Up/Down recall history.\n",
    );
    out
}

/// The `help COMMAND` text.
pub fn help_one(name: &str, testing: bool) -> Result<String, LineError> {
    let c = find(name, testing).ok_or_else(|| LineError::UnknownCommand(name.to_string()))?;
    let mut out = format!("usage: {}\n  {}\n", c.usage, c.summary);
    if !c.details.is_empty() {
        out.push_str(&format!("  {}\n", c.details));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_commands_and_checks_arguments() {
        let p = parse_line("version --json", false).unwrap().unwrap();
        assert_eq!(p.info.id, CommandId::Version);
        assert!(p.args().unwrap().flag("json"));
        assert!(parse_line("   ", false).unwrap().is_none());
        let e = parse_line("version --yaml", false).err().unwrap();
        assert_eq!(
            e.to_string(),
            "unknown option '--yaml' (usage: version [--json])"
        );
        let e = parse_line("log", false).err().unwrap();
        assert!(e.to_string().contains("usage: log level"), "{e}");
        let e = parse_line("uptime now", false).err().unwrap();
        assert!(e.to_string().contains("unexpected argument"), "{e}");
    }

    #[test]
    fn unknown_commands_are_named_safely() {
        let e = parse_line("frobnicate 1 2", false).err().unwrap();
        assert_eq!(
            e.to_string(),
            "unknown command 'frobnicate' (type 'help' for the list)"
        );
        let long = "x".repeat(200);
        let e = parse_line(&long, false).err().unwrap();
        assert!(e.to_string().len() < 100);
        let e = parse_line("\"unterminated", false).err().unwrap();
        assert!(matches!(e, LineError::Syntax(_)));
    }

    #[test]
    fn test_only_commands_are_hidden() {
        assert!(parse_line("crash panic", false).is_err());
        assert!(parse_line("crash panic", true).unwrap().is_some());
        assert!(!help_all(false).contains("crash"));
        assert!(help_all(true).contains("crash"));
        assert!(help_one("mem", false).unwrap().starts_with("usage: mem"));
        assert!(help_one("nope", false).is_err());
    }

    #[test]
    fn every_command_is_documented() {
        for c in COMMANDS {
            assert!(c.usage.starts_with(c.name), "{}", c.name);
            assert!(!c.summary.is_empty());
        }
    }
}
