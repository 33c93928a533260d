//! What an export handle names, and where each request on it goes *at the moment it is
//! submitted*. The handle chosen at the handshake names a stable identity: a device by its
//! index, or one snapshot by its instance number (assigned when the snapshot is created or
//! found at boot, never reused). What that identity is now (a plain device, the origin of
//! snapshots, a device holding a COW store, a snapshot being served, merged or deleted) is
//! looked up again for every read, write, flush and trim, so that a session opened before
//! `snapshot create` goes through copy-on-write from its next request, and a session on a
//! deleted snapshot can never reach a later snapshot with the same name or engine slot.
//!
//! Pure: the kernel's `Storage` implements [`Roles`]; the host tests use a table.

use super::proto::Errno;

/// Kind bits of a handle (bits 56..64).
const KIND_DEVICE: u64 = 1;
const KIND_SNAPSHOT: u64 = 2;

/// The stable identity an export handle names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportId {
    /// Device `disk` (an index into the kernel's device table), whatever its role.
    Device {
        /// Device index.
        disk: u16,
    },
    /// The snapshot with instance number `instance`, whose origin is device `disk` (the
    /// device whose buffers its I/O uses, even after the snapshot is gone).
    Snapshot {
        /// The origin device.
        disk: u16,
        /// Instance number: unique per snapshot since boot, never reused.
        instance: u32,
    },
}

impl ExportId {
    /// The handle: kind in bits 56..64, device in bits 32..48, instance in bits 0..32.
    pub fn handle(self) -> u64 {
        match self {
            ExportId::Device { disk } => (KIND_DEVICE << 56) | (u64::from(disk) << 32),
            ExportId::Snapshot { disk, instance } => {
                (KIND_SNAPSHOT << 56) | (u64::from(disk) << 32) | u64::from(instance)
            }
        }
    }

    /// The identity a handle names (`None` for a value no handle has).
    pub fn from_handle(handle: u64) -> Option<ExportId> {
        let disk = (handle >> 32) as u16;
        let low = handle as u32;
        if (handle >> 48) & 0xff != 0 {
            return None;
        }
        match handle >> 56 {
            KIND_DEVICE if low == 0 => Some(ExportId::Device { disk }),
            KIND_SNAPSHOT => Some(ExportId::Snapshot {
                disk,
                instance: low,
            }),
            _ => None,
        }
    }

    /// The device whose buffer pool and geometry the export's I/O uses.
    pub fn disk(self) -> usize {
        match self {
            ExportId::Device { disk } | ExportId::Snapshot { disk, .. } => usize::from(disk),
        }
    }
}

/// What a device is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRole {
    /// No such device.
    Missing,
    /// A device of its own: I/O goes to it directly.
    Plain,
    /// The origin of snapshots (or about to become one: a `snapshot create` is quiescing
    /// it): I/O goes through engine `origin`.
    Origin(usize),
    /// Holds a COW store (served by an engine, or found at boot and not served): only the
    /// engine (or nobody) may write it; reads go to the device.
    Store,
}

/// What a snapshot instance is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapRole {
    /// Its origin's engine.
    pub origin: usize,
    /// Its origin's device.
    pub disk: usize,
    /// Its slot in that engine.
    pub slot: u16,
    /// Active or invalid (its volume exists); not while it is created, merged or deleted.
    pub serving: bool,
}

/// The roles the kernel's volumes have now.
pub trait Roles {
    /// What device `disk` is.
    fn device_role(&self, disk: usize) -> DeviceRole;
    /// The snapshot with instance number `instance`, if it still exists.
    fn snapshot_role(&self, instance: u32) -> Option<SnapRole>;
}

/// Where one request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Straight to device `disk`.
    Device(usize),
    /// The origin volume of engine `origin`.
    Origin(usize),
    /// Snapshot `slot` of engine `origin`.
    Snapshot {
        /// The engine.
        origin: usize,
        /// The engine's slot.
        slot: u16,
    },
}

/// Where a request on `id` goes now; `writes` for a write or trim. Errors: `EPERM` for a
/// write to a device that holds a COW store, `EIO` for a snapshot that is gone (deleted,
/// being merged, being deleted) or a device that is missing.
pub fn route(id: ExportId, writes: bool, roles: &impl Roles) -> Result<Route, Errno> {
    match id {
        ExportId::Device { disk } => {
            let disk = usize::from(disk);
            match roles.device_role(disk) {
                DeviceRole::Missing => Err(Errno::Io),
                DeviceRole::Plain => Ok(Route::Device(disk)),
                DeviceRole::Origin(origin) => Ok(Route::Origin(origin)),
                DeviceRole::Store if writes => Err(Errno::Perm),
                DeviceRole::Store => Ok(Route::Device(disk)),
            }
        }
        ExportId::Snapshot { disk, instance } => match roles.snapshot_role(instance) {
            Some(s) if s.serving && s.disk == usize::from(disk) => Ok(Route::Snapshot {
                origin: s.origin,
                slot: s.slot,
            }),
            _ => Err(Errno::Io),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Roles as a table the test changes between requests.
    #[derive(Default)]
    struct Table {
        devices: Vec<DeviceRole>,
        snaps: Vec<(u32, SnapRole)>,
    }

    impl Roles for Table {
        fn device_role(&self, disk: usize) -> DeviceRole {
            self.devices
                .get(disk)
                .copied()
                .unwrap_or(DeviceRole::Missing)
        }
        fn snapshot_role(&self, instance: u32) -> Option<SnapRole> {
            self.snaps
                .iter()
                .find(|(i, _)| *i == instance)
                .map(|(_, s)| *s)
        }
    }

    #[test]
    fn handles_round_trip_and_reject_other_values() {
        let ids = [
            ExportId::Device { disk: 0 },
            ExportId::Device { disk: 65535 },
            ExportId::Snapshot {
                disk: 3,
                instance: 0,
            },
            ExportId::Snapshot {
                disk: 65535,
                instance: u32::MAX,
            },
        ];
        for id in ids {
            assert_eq!(ExportId::from_handle(id.handle()), Some(id), "{id:?}");
        }
        let mut handles: Vec<u64> = ids.iter().map(|i| i.handle()).collect();
        handles.sort_unstable();
        handles.dedup();
        assert_eq!(handles.len(), ids.len());
        for bad in [0, 3 << 56, (1 << 56) | 7, (1 << 56) | (1 << 48), u64::MAX] {
            assert_eq!(ExportId::from_handle(bad), None, "{bad:#x}");
        }
        assert_eq!(
            ExportId::Snapshot {
                disk: 4,
                instance: 9
            }
            .disk(),
            4
        );
    }

    #[test]
    fn a_device_is_routed_by_its_role_now() {
        let vda = ExportId::Device { disk: 0 };
        let mut t = Table {
            devices: vec![DeviceRole::Plain, DeviceRole::Plain],
            ..Table::default()
        };
        assert_eq!(route(vda, true, &t), Ok(Route::Device(0)));
        // `snapshot create s1 vda vdb`: vda is an origin, vdb a store.
        t.devices = vec![DeviceRole::Origin(0), DeviceRole::Store];
        assert_eq!(route(vda, true, &t), Ok(Route::Origin(0)));
        assert_eq!(route(vda, false, &t), Ok(Route::Origin(0)));
        let vdb = ExportId::Device { disk: 1 };
        assert_eq!(route(vdb, true, &t), Err(Errno::Perm));
        assert_eq!(route(vdb, false, &t), Ok(Route::Device(1)));
        // The snapshot deleted: vda is plain again, vdb too.
        t.devices = vec![DeviceRole::Plain, DeviceRole::Plain];
        assert_eq!(route(vda, true, &t), Ok(Route::Device(0)));
        assert_eq!(route(vdb, true, &t), Ok(Route::Device(1)));
        assert_eq!(
            route(ExportId::Device { disk: 2 }, false, &t),
            Err(Errno::Io)
        );
    }

    #[test]
    fn a_snapshot_session_never_reaches_a_later_snapshot() {
        let role = |serving| SnapRole {
            origin: 0,
            disk: 0,
            slot: 0,
            serving,
        };
        let s1 = ExportId::Snapshot {
            disk: 0,
            instance: 1,
        };
        let mut t = Table {
            devices: vec![DeviceRole::Origin(0), DeviceRole::Store],
            snaps: vec![(1, role(true))],
        };
        assert_eq!(
            route(s1, false, &t),
            Ok(Route::Snapshot { origin: 0, slot: 0 })
        );
        // Being merged: its volume is gone.
        t.snaps = vec![(1, role(false))];
        assert_eq!(route(s1, false, &t), Err(Errno::Io));
        assert_eq!(route(s1, true, &t), Err(Errno::Io));
        // Deleted, and a new snapshot with the same name in the same engine slot.
        t.snaps = vec![(2, role(true))];
        assert_eq!(route(s1, false, &t), Err(Errno::Io));
        let s1_again = ExportId::Snapshot {
            disk: 0,
            instance: 2,
        };
        assert_eq!(
            route(s1_again, false, &t),
            Ok(Route::Snapshot { origin: 0, slot: 0 })
        );
        // A handle whose device does not match the instance's origin is refused.
        let forged = ExportId::Snapshot {
            disk: 1,
            instance: 2,
        };
        assert_eq!(route(forged, false, &t), Err(Errno::Io));
    }
}
