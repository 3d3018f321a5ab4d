//! Live console sessions (GET /vms/{id}/console/ws): the VM's serial output
//! as QEMU prints it, and, unless read-only, input to the guest. Any number
//! of sessions share one console; `console.txt` keeps getting everything.
//! A session ends when QEMU closes the console (the VM stopped or exited)
//! or when vman shuts down.

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use super::{missing, Reason, Service, ServiceError};
use crate::model::Name;
use crate::operator::console::{Chunk, Console, WatchError, MAX_VIEWERS};

/// One viewer of a VM's console.
pub struct ConsoleSession {
    output: broadcast::Receiver<Chunk>,
    /// `None` for a read-only viewer: its input is dropped.
    input: Option<Arc<Console>>,
    closing: watch::Receiver<bool>,
}

/// What a session's next read gives.
pub enum ConsoleOutput {
    Data(Chunk),
    /// The viewer fell behind by this many chunks (they are lost to it; the
    /// console file still has them).
    Missed(u64),
    /// QEMU closed the console: the VM stopped.
    Ended,
    /// vman is shutting down.
    ShuttingDown,
}

impl ConsoleSession {
    pub async fn next(&mut self) -> ConsoleOutput {
        if *self.closing.borrow() {
            return ConsoleOutput::ShuttingDown;
        }
        tokio::select! {
            r = self.output.recv() => match r {
                Ok(chunk) => ConsoleOutput::Data(chunk),
                Err(broadcast::error::RecvError::Lagged(n)) => ConsoleOutput::Missed(n),
                Err(broadcast::error::RecvError::Closed) => ConsoleOutput::Ended,
            },
            _ = self.closing.changed() => ConsoleOutput::ShuttingDown,
        }
    }

    pub fn read_only(&self) -> bool {
        self.input.is_none()
    }

    /// Types `data` into the guest; a read-only session drops it.
    pub async fn write(&self, data: &[u8]) -> Result<(), ServiceError> {
        let Some(console) = &self.input else {
            return Ok(());
        };
        console
            .write(data)
            .await
            .map_err(|e| ServiceError::because(e, |e| format!("cannot write to the console: {e}")))
    }
}

impl Service {
    /// A live session on the console of a running VM.
    pub fn console_session(
        &self,
        id: &Name,
        read_only: bool,
    ) -> Result<ConsoleSession, ServiceError> {
        self.store.get_vm(id).map_err(missing("VM"))?;
        let run = self
            .live(id)
            .ok_or_else(|| Reason::NotRunning.refuse("VM is not running"))?;
        let console = run
            .console
            .clone()
            .ok_or_else(|| Reason::ConsoleNotConnected.refuse("VM console is not connected"))?;
        let output = console.watch().map_err(|e| match e {
            WatchError::Closed => Reason::ConsoleNotConnected.refuse("VM console is closed"),
            WatchError::Full => Reason::TooManyViewers.refuse(format!(
                "VM console has {MAX_VIEWERS} viewers already; close one"
            )),
        })?;
        Ok(ConsoleSession {
            output,
            input: (!read_only).then_some(console),
            closing: self.closing(),
        })
    }
}
