//! Wall-clock time (issue 18): the appliance reads the RTC at boot (UTC), `date` prints it,
//! and a snapshot records when it was taken: `snapshot list` (CREATED, `created` in
//! `--json`) and `snapshot status` show it, also after a reboot with the clock elsewhere; a
//! store whose binding has no time (older snapfw, Linux) shows `-` / `null`.

use tests::cow::bound_store;
use tests::{Boot, Image, Qemu};

const MIB: u64 = 1 << 20;

fn boot(rtc: &str, images: &[(&Image, &str)]) -> Qemu {
    let mut b = Boot::kernel("q35", "testing").args(["-rtc".to_string(), format!("base={rtc}")]);
    for (img, serial) in images {
        b = b.virtio_disk(&img.path, serial);
    }
    let mut q = b.start();
    q.wait_prompt();
    q
}

#[test]
fn date_and_snapshot_creation_times_come_from_the_rtc() {
    let (o, c, old) = (
        Image::new("clock-origin", 16 * MIB),
        Image::new("clock-cow", 16 * MIB),
        Image::new("clock-old", 16 * MIB),
    );
    // A store from before creation times: bound to the origin, time 0.
    bound_store(&old, "old", 8, "CLOCK-O", 16 * MIB, &[(3, 0x5a)]);
    let disks = [(&o, "CLOCK-O"), (&c, "CLOCK-C"), (&old, "CLOCK-OLD")];
    let mut q = boot("2030-01-02T03:04:05", &disks);
    assert!(
        q.transcript().contains("rtc: 2030-01-02T03:04:"),
        "{}",
        q.transcript()
    );
    let out = q.command("date");
    assert!(out.contains("2030-01-02T03:04:"), "{out}");
    assert!(out.trim_end().ends_with('Z'), "{out}");
    let out = q.command("date --json");
    assert!(out.contains(r#"{"utc":"2030-01-02T03:04:"#), "{out}");
    assert!(out.contains(r#""unix_seconds":18935534"#), "{out}");
    let out = q.command("date now");
    assert!(out.contains("error: "), "{out}");
    let out = q.command("snapshot create s1 vda vdb");
    assert!(out.contains("created snapshot s1"), "{out}");
    let list = q.command("snapshot list");
    assert!(list.contains("CREATED"), "{list}");
    let line = |list: &str, name: &str| {
        list.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {list}"))
            .to_string()
    };
    assert!(line(&list, "s1 ").contains("  2030-01-02T03:04:"), "{list}");
    assert!(line(&list, "old ").trim_end().ends_with("  -"), "{list}");
    let json = q.command("snapshot list --json");
    assert!(json.contains(r#""created":"2030-01-02T03:04:"#), "{json}");
    assert!(json.contains(r#""created":null"#), "{json}");
    let status = q.command("snapshot status s1");
    assert!(status.contains("created 2030-01-02T03:04:"), "{status}");
    q.poweroff();

    // A year later: the clock moved, the snapshot's time did not.
    let mut q = boot("2031-06-07T08:09:10", &disks);
    assert!(q.command("date").contains("2031-06-07T08:09:"));
    let list = q.command("snapshot list");
    assert!(line(&list, "s1 ").contains("  2030-01-02T03:04:"), "{list}");
    let status = q.command("snapshot status old");
    assert!(status.contains("created -"), "{status}");
    q.poweroff();
}

/// `prof`: samples where the CPU is while the timer runs faster, and the kernel's tick (the
/// `uptime` timer ticks) keeps its rate meanwhile and after; bad input gets one error.
#[test]
fn the_profiler_samples_the_cpu_and_the_kernel_tick_keeps_its_rate() {
    let d = Image::new("prof-disk", 16 * MIB);
    let mut q = boot("2030-01-02T03:04:05", &[(&d, "PROF-D")]);
    let out = q.command("prof start --hz 50");
    assert!(
        out.contains("error: prof: --hz 50 is out of range"),
        "{out}"
    );
    let out = q.command("prof sideways");
    assert!(
        out.contains("error: unknown prof action 'sideways'"),
        "{out}"
    );
    let ticks = |q: &mut Qemu| -> (u64, u64) {
        let json = q.command("uptime --json");
        let field = |name: &str| -> u64 {
            json.split(&format!("\"{name}\":"))
                .nth(1)
                .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in {json}"))
        };
        (field("uptime_ns"), field("timer_ticks"))
    };
    let (ns0, t0) = ticks(&mut q);
    // The rate is a multiple of the 100 Hz tick: the one set is said.
    let out = q.command("prof start --hz 5050");
    assert!(out.contains("profiling at 5000 samples/s"), "{out}");
    q.command("bench vda --rw randread --bs 4k --qd 32 --time 2s");
    let out = q.command("prof stop");
    // "prof: stopped, 5000 samples/s, S.MMM s: B busy, H halted (P% halted)"
    let count = |label: &str| -> u64 {
        out.split(label)
            .next()
            .and_then(|s| s.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{label} in {out}"))
    };
    let (busy, halted) = (count(" busy,"), count(" halted ("));
    assert!(busy > 0, "{out}");
    assert!(busy + halted > 2_000, "two seconds at 5000/s: {out}");
    // The kernel tick stays at 100 Hz (one per 10 ms) while the timer runs 50 times faster
    // (TCG may lose timer interrupts, never add them).
    let at_tick_rate = |(ns0, t0): (u64, u64), (ns1, t1): (u64, u64)| {
        let expected = (ns1 - ns0) as f64 / 1e7;
        let got = (t1 - t0) as f64;
        assert!(
            got <= expected * 1.5 && got >= expected * 0.3,
            "{got} ticks, expected {expected}"
        );
    };
    at_tick_rate((ns0, t0), ticks(&mut q));
    let out = q.command("prof show --top 5");
    let lines = out
        .lines()
        .filter(|l| l.trim_start().starts_with("0x"))
        .count();
    assert!((1..=5).contains(&lines), "{out}");
    // Back at the tick rate: a second later, about 100 more ticks.
    let before = ticks(&mut q);
    std::thread::sleep(std::time::Duration::from_secs(1));
    at_tick_rate(before, ticks(&mut q));
}
