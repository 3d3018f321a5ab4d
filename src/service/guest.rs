//! The service as the metadata service's `Source`: a VM's data as its
//! guest sees it (hostname defaulting to the VM's name, one key per
//! non-empty line), and the `metadata_fetched_at` record.

use std::sync::Arc;

use super::Service;
use crate::metadata::{GuestData, Metadata, Source};
use crate::model::Name;

impl Source for Service {
    fn guest_data(&self, id: &Name) -> Option<GuestData> {
        let vm = self.store.get_vm(id).ok()?;
        let m = self.store.get_metadata(id).ok()?;
        Some(GuestData {
            hostname: m.hostname.unwrap_or_else(|| id.to_string()),
            user_data: m.user_data,
            ssh_keys: m
                .ssh_keys
                .unwrap_or_default()
                .iter()
                .flat_map(|k| k.lines())
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect(),
            mac: crate::model::mac_for(id.as_str()),
            local_ip: vm.local_ip,
            id: vm.id,
        })
    }

    fn record_fetch(&self, id: &Name) {
        if let Err(e) = self.store.set_metadata_fetched(id, &crate::model::now()) {
            tracing::warn!("vm {id}: cannot record the metadata fetch: {e}");
        }
    }
}

impl Service {
    /// Connects the metadata service to this service's data; call once
    /// the service is in its `Arc`.
    pub fn wire_metadata(self: &Arc<Self>) {
        let weak: std::sync::Weak<dyn Source> = Arc::downgrade(self) as _;
        self.metadata.set_source(weak);
    }

    /// The metadata service (for the transports that serve it).
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }
}
