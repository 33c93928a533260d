//! Wall-clock time: the CMOS real-time clock read once at boot (UTC, as hypervisors and
//! servers keep it), then carried forward by the TSC uptime. `date` prints it and snapshots
//! record their creation time from it.
//!
//! The RTC's registers: seconds 0x00, minutes 0x02, hours 0x04, day 0x07, month 0x08, year
//! 0x09 (two digits), status A 0x0A (bit 7: an update is in progress), status B 0x0B (bit 1:
//! 24-hour mode, bit 2: binary rather than BCD). The two-digit year is taken as 20YY: the
//! ACPI century register is not read, so dates after 2099 would need it.

use core::fmt;

/// The RTC's time registers as read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RtcRegs {
    pub seconds: u8,
    pub minutes: u8,
    pub hours: u8,
    pub day: u8,
    pub month: u8,
    pub year: u8,
    pub status_b: u8,
}

impl RtcRegs {
    /// Seconds since 1970-01-01T00:00:00Z, or `None` when a field is out of range (an RTC
    /// that was never set, or read mid-update).
    pub fn unix_seconds(&self) -> Option<u64> {
        let binary = self.status_b & 0x04 != 0;
        let h24 = self.status_b & 0x02 != 0;
        let conv = |v: u8| -> Option<u8> {
            if binary {
                Some(v)
            } else if v & 0x0f < 10 && v >> 4 < 10 {
                Some((v >> 4) * 10 + (v & 0x0f))
            } else {
                None
            }
        };
        let pm = !h24 && self.hours & 0x80 != 0;
        let mut hours = conv(self.hours & 0x7f)?;
        if !h24 {
            // 12-hour mode: 12 AM is 0, 12 PM is 12.
            if !(1..=12).contains(&hours) {
                return None;
            }
            hours = hours % 12 + if pm { 12 } else { 0 };
        }
        let (minutes, seconds) = (conv(self.minutes)?, conv(self.seconds)?);
        let (day, month, year) = (conv(self.day)?, conv(self.month)?, conv(self.year)?);
        if hours > 23 || minutes > 59 || seconds > 59 || year > 99 {
            return None;
        }
        let year = 2000 + i64::from(year);
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        let days = days_from_civil(year, month, day);
        let secs =
            days * 86_400 + i64::from(hours) * 3600 + i64::from(minutes) * 60 + i64::from(seconds);
        u64::try_from(secs).ok()
    }
}

fn leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u8) -> u8 {
    match m {
        2 if leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number since 1970-01-01: (year, month, day).
pub fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A time as ISO 8601 in UTC: `2030-01-02T03:04:05Z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iso8601(pub u64);

impl fmt::Display for Iso8601 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0 as i64;
        let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
        let t = secs.rem_euclid(86_400);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            t / 3600,
            t / 60 % 60,
            t % 60
        )
    }
}

/// Creation times read from stores: 0 means "not recorded" (stores made before snapfw read
/// the clock, or by Linux), shown as `-`.
pub struct Created(pub u64);

impl fmt::Display for Created {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            f.write_str("-")
        } else {
            Iso8601(self.0).fmt(f)
        }
    }
}

#[cfg(target_os = "none")]
mod clock {
    use core::sync::atomic::{AtomicU64, Ordering};

    use super::RtcRegs;
    use crate::arch::cpu;

    /// Unix seconds at uptime 0 (0: no clock).
    static BOOT_UNIX: AtomicU64 = AtomicU64::new(0);

    fn cmos(reg: u8) -> u8 {
        // Bit 7 of the index port keeps NMIs enabled as they were (clear: enabled).
        cpu::outb(0x70, reg & 0x7f);
        cpu::inb(0x71)
    }

    fn regs() -> RtcRegs {
        RtcRegs {
            seconds: cmos(0x00),
            minutes: cmos(0x02),
            hours: cmos(0x04),
            day: cmos(0x07),
            month: cmos(0x08),
            year: cmos(0x09),
            status_b: cmos(0x0b),
        }
    }

    /// Reads the RTC (at boot: it waits, a bounded number of reads, for an update to end and
    /// for two reads in a row to agree) and starts the wall clock. Logs what it found.
    pub fn init() {
        let mut last = None;
        for _ in 0..10_000 {
            if cmos(0x0a) & 0x80 != 0 {
                continue;
            }
            let r = regs();
            if last == Some(r) {
                match r.unix_seconds() {
                    Some(t) => {
                        let up = crate::time::uptime_ns() / 1_000_000_000;
                        BOOT_UNIX.store(t.saturating_sub(up).max(1), Ordering::Relaxed);
                        log::info!("rtc: {} (UTC)", super::Iso8601(t));
                    }
                    None => log::warn!("rtc: the clock holds no valid date ({r:?}); no wall time"),
                }
                return;
            }
            last = Some(r);
        }
        log::warn!("rtc: the clock did not settle; no wall time");
    }

    /// Unix seconds now, if the RTC gave a date at boot.
    pub fn now() -> Option<u64> {
        let boot = BOOT_UNIX.load(Ordering::Relaxed);
        (boot != 0).then(|| boot + crate::time::uptime_ns() / 1_000_000_000)
    }
}

#[cfg(target_os = "none")]
pub use clock::{init, now};

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    fn bcd(v: u8) -> u8 {
        (v / 10) << 4 | (v % 10)
    }

    #[test]
    fn bcd_24h_and_binary_12h_read_the_same_time() {
        // 2030-01-02T03:04:05Z = 1893553445.
        let r = RtcRegs {
            seconds: bcd(5),
            minutes: bcd(4),
            hours: bcd(3),
            day: bcd(2),
            month: bcd(1),
            year: bcd(30),
            status_b: 0x02,
        };
        assert_eq!(r.unix_seconds(), Some(1_893_553_445));
        let b = RtcRegs {
            seconds: 5,
            minutes: 4,
            hours: 3,
            day: 2,
            month: 1,
            year: 30,
            status_b: 0x04,
        };
        assert_eq!(b.unix_seconds(), Some(1_893_553_445));
        // 12-hour mode: 3 PM is 15:00; 12 AM is midnight, 12 PM noon.
        let pm = RtcRegs {
            hours: 0x80 | 3,
            ..b
        };
        assert_eq!(pm.unix_seconds(), Some(1_893_553_445 + 12 * 3600));
        let midnight = RtcRegs { hours: 12, ..b };
        assert_eq!(midnight.unix_seconds(), Some(1_893_553_445 - 3 * 3600));
        let noon = RtcRegs {
            hours: 0x80 | 12,
            ..b
        };
        assert_eq!(noon.unix_seconds(), Some(1_893_553_445 + 9 * 3600));
    }

    #[test]
    fn nonsense_registers_give_no_time() {
        let ok = RtcRegs {
            seconds: 0,
            minutes: 0,
            hours: 0,
            day: 29,
            month: 2,
            year: 28,
            status_b: 0x06,
        };
        assert!(ok.unix_seconds().is_some(), "2028 is a leap year");
        for bad in [
            RtcRegs { year: 27, ..ok },
            RtcRegs { month: 13, ..ok },
            RtcRegs { month: 0, ..ok },
            RtcRegs { day: 0, ..ok },
            RtcRegs { hours: 24, ..ok },
            RtcRegs { minutes: 60, ..ok },
            RtcRegs { seconds: 60, ..ok },
            RtcRegs { year: 100, ..ok },
            RtcRegs {
                status_b: 0x00,
                seconds: 0x5a,
                ..ok
            },
            RtcRegs {
                status_b: 0x04,
                hours: 0,
                ..ok
            },
        ] {
            assert_eq!(bad.unix_seconds(), None, "{bad:?}");
        }
        assert_eq!(RtcRegs::default().unix_seconds(), None);
    }

    #[test]
    fn dates_round_trip_and_print_as_iso_8601() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        for z in [-1, 59, 60, 365, 10_957, 11_016, 18_321, 47_482, 200_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z, "{z}");
        }
        assert_eq!(
            format!("{}", Iso8601(1_893_553_445)),
            "2030-01-02T03:04:05Z"
        );
        assert_eq!(format!("{}", Iso8601(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(format!("{}", Created(0)), "-");
        assert_eq!(format!("{}", Created(86_399)), "1970-01-01T23:59:59Z");
    }
}
