//! The one writer of a VM's state. Every change of `state` (with its pid,
//! `last_error` and, at a start, its root disk) is an event recorded by
//! `Service::record`: it reads the current state, asks the transition table
//! (`VmState::next`) where the event leads, and writes only if the VM is
//! still in the state it read (`Store::transition_vm`), so a stale writer
//! cannot overwrite a newer state. Events that record a QEMU that already
//! ended (`VmEvent::records_an_end`: stop, exit, gone, kill) write through
//! the database's space reserve (`Store::reserved`) and, when even that
//! fails, are kept for the observer to record (`space.rs`). The pure part,
//! `plan`, is unit-tested here without a database or QEMU.

use super::{Service, ServiceError};
use crate::model::{ImageFormat, Name, RootDiskSource, Vm, VmEvent, VmState};
use crate::store::{StoreError, VmRuntime, VmWrite};

/// What goes with an event: the pid of the QEMU when the VM runs, the
/// error the user sees (`None` clears it), the root disk of a start.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Detail {
    pub pid: Option<i64>,
    pub error: Option<String>,
    pub root_disk: Option<(RootDiskSource, String, u64, ImageFormat)>,
    /// Why it happened, for its event only (not stored with the VM).
    pub cause: Option<String>,
}

impl Detail {
    /// Nothing to say: the pid and the error are cleared.
    pub fn clear() -> Self {
        Self::default()
    }

    /// A running QEMU, no error.
    pub fn pid(pid: i32) -> Self {
        Self {
            pid: Some(i64::from(pid)),
            ..Self::default()
        }
    }

    /// The error the user sees in `last_error`.
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            error: Some(msg.into()),
            ..Self::default()
        }
    }

    pub fn with_error(mut self, msg: impl Into<String>) -> Self {
        self.error = Some(msg.into());
        self
    }

    pub fn because(mut self, cause: impl Into<String>) -> Self {
        self.cause = Some(cause.into());
        self
    }
}

/// Why an event was not recorded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    /// The transition table has no arrow for this event in this state.
    #[error("VM {id} is {from}: it cannot be recorded {event}")]
    Refused {
        id: Name,
        from: VmState,
        event: VmEvent,
    },
    /// Another writer changed the state between the read and the write.
    #[error("VM {id} changed from {expected} to {found} meanwhile: not recorded {event}")]
    Stale {
        id: Name,
        expected: VmState,
        found: VmState,
        event: VmEvent,
    },
    /// The VM is missing, the database refused, or the disk is full.
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl From<RecordError> for ServiceError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::Service(e) => e,
            refused => super::Reason::InvalidTransition.refuse(refused.to_string()),
        }
    }
}

/// The write an event makes, and whether it must land on a full disk.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Planned {
    pub change: VmRuntime,
    pub reserved: bool,
}

/// The pure decision: where `event` takes a VM in state `from`, and what is
/// written with it; `None` when the table refuses the event. A VM that is
/// not running has no pid.
pub(crate) fn plan(from: VmState, event: VmEvent, detail: &Detail) -> Option<Planned> {
    let to = from.next(event)?;
    Some(Planned {
        change: VmRuntime {
            state: to,
            pid: detail.pid.filter(|_| to == VmState::Running),
            last_error: detail.error.clone(),
            root_disk: detail.root_disk.clone(),
        },
        reserved: event.records_an_end(),
    })
}

impl Service {
    /// Records `event` for VM `id` (call under the VM's lock): the only
    /// place a VM's state is written.
    pub(crate) fn record(
        &self,
        id: &Name,
        event: VmEvent,
        detail: Detail,
    ) -> Result<Vm, RecordError> {
        let from = self.store.get_vm(id).map_err(super::missing("VM"))?.state;
        let Some(planned) = plan(from, event, &detail) else {
            return Err(RecordError::Refused {
                id: id.clone(),
                from,
                event,
            });
        };
        let write = |s: &crate::store::Store| s.transition_vm(id, from, &planned.change);
        let written = if planned.reserved {
            match self.store.reserved(write) {
                Err(e @ StoreError::Full(_)) => {
                    // It happened: the observer records it once it can.
                    self.keep_unrecorded(id, event, detail);
                    return Err(unrecorded_error(id, event, e).into());
                }
                other => other,
            }
        } else {
            write(&self.store)
        };
        match written.map_err(super::missing("VM"))? {
            VmWrite::Written(vm) => {
                if planned.reserved {
                    self.take_unrecorded(id);
                }
                tracing::debug!("vm {id}: {from} --{event}--> {}", vm.state);
                self.emit_vm_change(&vm, from, event, &detail);
                Ok(*vm)
            }
            VmWrite::Stale(found) => Err(RecordError::Stale {
                id: id.clone(),
                expected: from,
                found,
                event,
            }),
        }
    }
}

/// The error of a state write that failed after the action was done (a
/// QEMU already stopped): a 507 that says so, not "nothing was changed".
fn unrecorded_error(id: &Name, event: VmEvent, e: StoreError) -> ServiceError {
    match e {
        StoreError::Full(why) => {
            tracing::error!("vm {id}: {event}, but its state could not be recorded: {why}");
            ServiceError::NoSpace(format!(
                "VM {id} is stopped, but no space is left on the storage to record it; \
                 free some space: the observer then records it"
            ))
        }
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmEvent::*;
    use VmState::{Error, Running, Stopped};

    #[test]
    fn a_start_writes_running_with_its_pid_and_root_disk_and_clears_the_error() {
        let root = (
            RootDiskSource::Default,
            "/s/vms/a/root.qcow2".to_owned(),
            8 << 20,
            ImageFormat::Qcow2,
        );
        let detail = Detail {
            root_disk: Some(root.clone()),
            ..Detail::pid(42)
        };
        for from in [Stopped, Error] {
            let p = plan(from, Started, &detail).expect("allowed");
            assert_eq!(
                p.change,
                VmRuntime {
                    state: Running,
                    pid: Some(42),
                    last_error: None,
                    root_disk: Some(root.clone()),
                }
            );
            assert!(!p.reserved, "a start must not use the space reserve");
        }
        assert_eq!(plan(Running, Started, &detail), None);
    }

    #[test]
    fn ends_clear_the_pid_and_use_the_space_reserve() {
        // A pid given by mistake is never written for a VM that does not run.
        let detail = Detail::pid(9).with_error("QEMU exited unexpectedly");
        let p = plan(Running, Gone, &detail).expect("allowed");
        assert_eq!(p.change.state, Error);
        assert_eq!(p.change.pid, None);
        assert_eq!(
            p.change.last_error.as_deref(),
            Some("QEMU exited unexpectedly")
        );
        assert!(p.reserved);
        let p = plan(Running, Halted, &Detail::clear()).expect("allowed");
        assert_eq!((p.change.state, p.change.pid), (Stopped, None));
        assert_eq!(p.change.last_error, None);
        assert!(p.reserved);
        for from in [Stopped, Running, Error] {
            let p = plan(from, Killed, &Detail::clear()).expect("allowed");
            assert_eq!((p.change.state, p.reserved), (Stopped, true));
        }
        assert_eq!(plan(Stopped, Halted, &Detail::clear()), None);
        assert_eq!(plan(Stopped, Gone, &Detail::clear()), None);
    }

    #[test]
    fn a_failed_start_records_the_reason_without_the_space_reserve() {
        let p = plan(Stopped, Failed, &Detail::error("no qemu")).expect("allowed");
        assert_eq!(p.change.state, Error);
        assert_eq!(p.change.last_error.as_deref(), Some("no qemu"));
        assert!(!p.reserved);
        assert_eq!(plan(Running, Failed, &Detail::error("x")), None);
    }

    #[test]
    fn adoption_records_running_from_any_state() {
        for from in [Stopped, Running, Error] {
            let p = plan(from, Adopted, &Detail::pid(7)).expect("allowed");
            assert_eq!((p.change.state, p.change.pid), (Running, Some(7)));
            assert_eq!(p.change.last_error, None);
            let pending = Detail::pid(7).with_error("adoption pending");
            let p = plan(from, AdoptionPending, &pending).expect("allowed");
            assert_eq!((p.change.state, p.change.pid), (Running, Some(7)));
            assert_eq!(p.change.last_error.as_deref(), Some("adoption pending"));
            assert!(!p.reserved);
        }
    }

    #[test]
    fn plan_follows_the_transition_table_for_every_pair() {
        for from in [Stopped, Running, Error] {
            for event in [
                Started,
                Failed,
                Halted,
                Gone,
                Killed,
                Adopted,
                AdoptionPending,
            ] {
                let planned = plan(from, event, &Detail::pid(3));
                assert_eq!(
                    planned.as_ref().map(|p| p.change.state),
                    from.next(event),
                    "{from} + {event}"
                );
            }
        }
    }
}
