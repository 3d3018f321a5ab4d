//! Pure decisions about data disks, kept apart from the store and QEMU so
//! they are unit-tested without either: where each cold-attached disk sits
//! at boot (`boot_slots`), and what to do when the disks recorded attached
//! to a running VM and those its QEMU has plugged disagree (`reconcile`).
//! `disks.rs` gathers the facts, calls these, and carries out the result.

use std::collections::HashSet;

use crate::model::Name;

/// Where one cold-attached disk sits when its VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    pub id: Name,
    pub slot: u8,
    /// It is not on its recorded slot (none, taken twice, or beyond
    /// `VMAN_HOTPLUG_SLOTS`): the new slot is recorded once QEMU runs.
    pub moved: bool,
}

/// More disks are attached than the VM has hot-plug slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooManyDisks {
    pub disks: usize,
    pub slots: u8,
}

/// Slots for the disks recorded attached to a VM (`(id, recorded slot)`,
/// in slot order): each keeps its slot when it is below `slots` and not
/// taken by an earlier one; the others move to the lowest free slots.
/// Disks that keep their slot come first, then the moved ones.
pub(crate) fn boot_slots(
    recorded: &[(Name, Option<u8>)],
    slots: u8,
) -> Result<Vec<Placement>, TooManyDisks> {
    let mut used = HashSet::new();
    let mut out = Vec::with_capacity(recorded.len());
    let mut moved = Vec::new();
    for (id, slot) in recorded {
        match slot {
            Some(s) if *s < slots && used.insert(*s) => out.push(Placement {
                id: id.clone(),
                slot: *s,
                moved: false,
            }),
            _ => moved.push(id),
        }
    }
    for id in moved {
        let slot = (0..slots).find(|s| !used.contains(s)).ok_or(TooManyDisks {
            disks: recorded.len(),
            slots,
        })?;
        used.insert(slot);
        out.push(Placement {
            id: id.clone(),
            slot,
            moved: true,
        });
    }
    Ok(out)
}

/// A disk QEMU has plugged into a VM, with what the database says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plugged {
    pub id: Name,
    /// The hot-plug slot it sits on, when QEMU says.
    pub slot: Option<u8>,
    /// `None`: the database has no such disk; `Some(None)`: recorded
    /// detached; `Some(Some((vm, slot)))`: recorded attached there.
    pub record: Option<Option<(Name, u8)>>,
}

/// What to do about one disk of a running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DiskAction {
    /// Recorded and plugged alike.
    Confirmed { id: Name, slot: u8 },
    /// Plugged on `slot`: record it attached there (it was recorded
    /// detached when `was` is `None`, on another slot otherwise).
    Record { id: Name, slot: u8, was: Option<u8> },
    /// Plugged, but recorded attached to another VM, or on no slot QEMU
    /// names: only reported.
    Conflict {
        id: Name,
        slot: Option<u8>,
        recorded_on: Option<Name>,
    },
    /// Plugged, but the database has no such disk: only reported.
    Unknown { id: Name },
    /// Recorded attached on `slot`, but QEMU does not have it plugged:
    /// complete a detach the guest made, or plug it again.
    Missing { id: Name, slot: u8 },
}

/// Compares what QEMU has plugged into `vm` with the disks recorded
/// attached to it (`(id, recorded slot)`). One action per plugged disk, in
/// order, then one per recorded disk QEMU lacks.
pub(crate) fn reconcile(
    vm: &Name,
    plugged: &[Plugged],
    recorded: &[(Name, Option<u8>)],
) -> Vec<DiskAction> {
    let mut out = Vec::with_capacity(plugged.len() + recorded.len());
    for p in plugged {
        let id = p.id.clone();
        out.push(match (&p.record, p.slot) {
            (None, _) => DiskAction::Unknown { id },
            (Some(Some((owner, slot))), Some(s)) if owner == vm && *slot == s => {
                DiskAction::Confirmed { id, slot: s }
            }
            (Some(None), Some(s)) => DiskAction::Record {
                id,
                slot: s,
                was: None,
            },
            (Some(Some((owner, slot))), Some(s)) if owner == vm => DiskAction::Record {
                id,
                slot: s,
                was: Some(*slot),
            },
            (Some(record), slot) => DiskAction::Conflict {
                id,
                slot,
                recorded_on: record.as_ref().map(|(o, _)| o.clone()),
            },
        });
    }
    let seen: HashSet<&Name> = plugged.iter().map(|p| &p.id).collect();
    out.extend(
        recorded
            .iter()
            .filter(|(id, _)| !seen.contains(id))
            .map(|(id, slot)| DiskAction::Missing {
                id: id.clone(),
                slot: slot.unwrap_or(0),
            }),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::parse("id", s).expect("name")
    }

    fn at(id: &str, slot: u8, moved: bool) -> Placement {
        Placement {
            id: n(id),
            slot,
            moved,
        }
    }

    #[test]
    fn boot_slots_keep_recorded_slots() {
        let got = boot_slots(&[(n("a"), Some(0)), (n("b"), Some(2))], 4).expect("fits");
        assert_eq!(got, vec![at("a", 0, false), at("b", 2, false)]);
        assert_eq!(boot_slots(&[], 0), Ok(vec![]));
    }

    #[test]
    fn boot_slots_move_disks_beyond_the_slots_to_the_lowest_free_ones() {
        // VMAN_HOTPLUG_SLOTS lowered from 8 to 3: hp5 and hp7 are gone.
        let got = boot_slots(
            &[(n("a"), Some(1)), (n("b"), Some(5)), (n("c"), Some(7))],
            3,
        )
        .expect("fits");
        assert_eq!(
            got,
            vec![at("a", 1, false), at("b", 0, true), at("c", 2, true)]
        );
    }

    #[test]
    fn boot_slots_move_a_second_disk_on_one_slot_and_one_without_slot() {
        let got =
            boot_slots(&[(n("a"), Some(0)), (n("b"), Some(0)), (n("c"), None)], 3).expect("fits");
        assert_eq!(
            got,
            vec![at("a", 0, false), at("b", 1, true), at("c", 2, true)]
        );
    }

    #[test]
    fn boot_slots_refuse_more_disks_than_slots() {
        assert_eq!(
            boot_slots(
                &[(n("a"), Some(0)), (n("b"), Some(1)), (n("c"), Some(2))],
                2
            ),
            Err(TooManyDisks { disks: 3, slots: 2 })
        );
        assert_eq!(
            boot_slots(&[(n("a"), None)], 0),
            Err(TooManyDisks { disks: 1, slots: 0 })
        );
    }

    fn plugged(id: &str, slot: Option<u8>, record: Option<Option<(&str, u8)>>) -> Plugged {
        Plugged {
            id: n(id),
            slot,
            record: record.map(|r| r.map(|(vm, s)| (n(vm), s))),
        }
    }

    #[test]
    fn reconcile_decides_for_every_plugged_and_recorded_disk() {
        let vm = n("vm");
        let plugged = [
            plugged("same", Some(0), Some(Some(("vm", 0)))),
            plugged("detached", Some(1), Some(None)),
            plugged("moved", Some(2), Some(Some(("vm", 5)))),
            plugged("other", Some(3), Some(Some(("vm2", 3)))),
            plugged("noslot", None, Some(Some(("vm", 4)))),
            plugged("ghost", Some(4), None),
        ];
        let recorded = [
            (n("same"), Some(0)),
            (n("moved"), Some(5)),
            (n("noslot"), Some(4)),
            (n("lost"), Some(6)),
        ];
        assert_eq!(
            reconcile(&vm, &plugged, &recorded),
            vec![
                DiskAction::Confirmed {
                    id: n("same"),
                    slot: 0
                },
                DiskAction::Record {
                    id: n("detached"),
                    slot: 1,
                    was: None
                },
                DiskAction::Record {
                    id: n("moved"),
                    slot: 2,
                    was: Some(5)
                },
                DiskAction::Conflict {
                    id: n("other"),
                    slot: Some(3),
                    recorded_on: Some(n("vm2"))
                },
                DiskAction::Conflict {
                    id: n("noslot"),
                    slot: None,
                    recorded_on: Some(n("vm"))
                },
                DiskAction::Unknown { id: n("ghost") },
                DiskAction::Missing {
                    id: n("lost"),
                    slot: 6
                },
            ]
        );
    }

    #[test]
    fn reconcile_with_nothing_plugged_replugs_every_recorded_disk() {
        let got = reconcile(&n("vm"), &[], &[(n("a"), Some(1)), (n("b"), None)]);
        assert_eq!(
            got,
            vec![
                DiskAction::Missing {
                    id: n("a"),
                    slot: 1
                },
                DiskAction::Missing {
                    id: n("b"),
                    slot: 0
                },
            ]
        );
        assert_eq!(reconcile(&n("vm"), &[], &[]), vec![]);
    }
}
