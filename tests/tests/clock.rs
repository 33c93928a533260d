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
