//! The in-memory view of the spool: every live message, where its bytes
//! are, and how many live messages pin each segment.

use std::collections::{BTreeMap, BTreeSet};

use crate::MessageId;
use std::sync::Arc;

use crate::envelope::{DeliveryRecord, Envelope};
use crate::record::Extent;

pub(crate) struct Entry {
    /// Never changes after the commit; shared with readers.
    pub envelope: Arc<Envelope>,
    /// The delivery side's latest record.
    pub delivery: DeliveryRecord,
    /// Body pieces in order.
    pub extents: Vec<Extent>,
    /// Segment holding the message's latest `Commit` record.
    pub commit_seg: u64,
}

impl Entry {
    pub(crate) fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| u64::from(e.len)).sum()
    }

    /// Segments this message needs to survive.
    pub(crate) fn segments(&self) -> BTreeSet<u64> {
        let mut s: BTreeSet<u64> = self.extents.iter().map(|e| e.seg).collect();
        s.insert(self.commit_seg);
        s
    }
}

#[derive(Default)]
pub(crate) struct Index {
    pub messages: BTreeMap<MessageId, Entry>,
    /// Segment number -> live messages that need it.
    pub segments: BTreeMap<u64, usize>,
    /// Segment files on disk, the active one included.
    pub files: BTreeSet<u64>,
    /// Body bytes of all live messages.
    pub live_bytes: u64,
}

impl Index {
    pub(crate) fn insert(&mut self, id: MessageId, entry: Entry) {
        self.live_bytes += entry.bytes();
        for seg in entry.segments() {
            *self.segments.entry(seg).or_default() += 1;
        }
        if let Some(old) = self.messages.insert(id, entry) {
            self.unpin(&old);
        }
    }

    pub(crate) fn remove(&mut self, id: MessageId) -> Option<Entry> {
        let old = self.messages.remove(&id)?;
        self.unpin(&old);
        Some(old)
    }

    fn unpin(&mut self, entry: &Entry) {
        self.live_bytes = self.live_bytes.saturating_sub(entry.bytes());
        for seg in entry.segments() {
            if let Some(n) = self.segments.get_mut(&seg) {
                *n = n.saturating_sub(1);
            }
        }
    }

    /// Ids of the live messages that pin `seg`.
    pub(crate) fn pinning(&self, seg: u64) -> Vec<MessageId> {
        self.messages
            .iter()
            .filter(|(_, e)| e.commit_seg == seg || e.extents.iter().any(|x| x.seg == seg))
            .map(|(id, _)| *id)
            .collect()
    }
}
