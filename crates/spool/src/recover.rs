//! Rebuilding the index from the segments at start-up.
//!
//! Every record's checksum is verified. A bad record at the end of a segment
//! is a write that was never acknowledged (a crash mid-batch) and is dropped.
//! A bad region followed by valid records is corruption: it is copied to
//! `corrupt/` and the scan resumes at the next valid record. A commit whose
//! body pieces cannot all be found is moved aside the same way, unless a
//! later record ends the message anyway: a `Remove` (the message was
//! delivered, and the old segments holding its pieces were then reclaimed
//! while its `Commit` lived on in a newer one) or a complete `Commit` of the
//! same id (a copy made by compaction).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{error, info, warn};

use crate::MessageId;
use crate::index::{Entry, Index};
use crate::record::{self, Extent, HEADER_LEN, Header, Kind, MAGIC};
use crate::segment;

/// What recovery found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Committed messages found again.
    pub messages: usize,
    /// Segment files read.
    pub segments: usize,
    /// Bytes of unacknowledged, torn tail dropped.
    pub torn_bytes: u64,
    /// Damaged regions or messages moved to `corrupt/`.
    pub moved_aside: usize,
    /// Stray temporary files removed.
    pub temporaries_removed: usize,
}

pub(crate) struct Recovered {
    pub index: Index,
    pub last_segment: u64,
    pub last_id: u64,
    pub report: Recovery,
}

pub(crate) fn recover(dir: &Path) -> io::Result<Recovered> {
    let mut segs = Vec::new();
    let mut report = Recovery::default();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(no) = segment::parse_name(&name) {
            segs.push(no);
        } else if name.ends_with(".tmp") {
            // Nothing in this layout is written through temporaries, but an
            // older layout or a tool may have left one: it was never
            // acknowledged.
            std::fs::remove_file(entry.path())?;
            report.temporaries_removed += 1;
        }
    }
    segs.sort_unstable();

    let mut index = Index::default();
    // (segment, payload offset after the id) -> (message id, length)
    let mut chunks: HashMap<(u64, u64), (u64, u32)> = HashMap::new();
    let mut last_id = 0u64;
    // Commits that cannot be used, unless a later record ends the message:
    // id -> (segment, offset, the envelope bytes to keep for a human).
    let mut damaged: HashMap<MessageId, (u64, usize, Vec<u8>)> = HashMap::new();

    for &seg in &segs {
        index.files.insert(seg);
        report.segments += 1;
        let data = std::fs::read(segment::path(dir, seg))?;
        let Some((seed, format)) = segment::read_header(&data) else {
            if data.iter().any(|&b| b != 0) {
                // Not one of our segments (or its header is damaged): keep
                // it for a human, never guess at its records.
                let saved = save_aside(dir, &format!("seg-{seg:016x}.unreadable"), &data);
                error!(segment = seg, saved = %saved.display(), "spool segment without a valid header moved aside");
                report.moved_aside += 1;
            }
            // An empty or zero-filled file: created just before a crash, so
            // nothing in it was ever acknowledged.
            continue;
        };
        let mut pos = segment::FILE_HEADER_LEN as usize;
        while pos < data.len() {
            let Some((header, payload)) = valid_record(&data, pos, seed) else {
                match resync(&data, pos + 1, seed) {
                    Some(next) => {
                        let region = &data[pos..next];
                        let saved =
                            save_aside(dir, &format!("seg-{seg:016x}-at-{pos}.bin"), region);
                        error!(
                            segment = seg,
                            offset = pos,
                            bytes = region.len(),
                            saved = %saved.display(),
                            "corrupt spool record moved aside; continuing with the next valid record"
                        );
                        report.moved_aside += 1;
                        pos = next;
                        continue;
                    }
                    None => {
                        let torn = (data.len() - pos) as u64;
                        if data[pos..].iter().any(|&b| b != 0) {
                            info!(
                                segment = seg,
                                offset = pos,
                                bytes = torn,
                                "dropping an unacknowledged partial write at the end of a spool segment"
                            );
                        }
                        report.torn_bytes += torn;
                        break;
                    }
                }
            };
            let payload_off = (pos + HEADER_LEN) as u64;
            match header.kind {
                Kind::Data => {
                    if let Some(id) = record::payload_id(payload) {
                        chunks.insert((seg, payload_off + 8), (id, (payload.len() - 8) as u32));
                        last_id = last_id.max(id);
                    }
                }
                Kind::Commit => {
                    let Some(c) = record::decode_commit(payload, format) else {
                        report.moved_aside += 1;
                        let saved = save_aside(
                            dir,
                            &format!("seg-{seg:016x}-at-{pos}.bin"),
                            &data[pos..pos + HEADER_LEN + payload.len()],
                        );
                        error!(segment = seg, offset = pos, saved = %saved.display(), "undecodable commit record moved aside");
                        pos += HEADER_LEN + header.len;
                        continue;
                    };
                    last_id = last_id.max(c.id);
                    let id = MessageId::from_u64(c.id);
                    let missing = c
                        .extents
                        .iter()
                        .any(|e| chunks.get(&(e.seg, e.off)) != Some(&(c.id, e.len)));
                    match c.stored {
                        Some((envelope, delivery)) if !missing => {
                            damaged.remove(&id);
                            let mut extents = c.extents;
                            if c.tail_len > 0 {
                                extents.push(Extent {
                                    seg,
                                    off: payload_off + c.tail_off as u64,
                                    len: c.tail_len as u32,
                                });
                            }
                            index.insert(
                                id,
                                Entry {
                                    envelope: std::sync::Arc::new(envelope),
                                    delivery,
                                    extents,
                                    commit_seg: seg,
                                },
                            );
                        }
                        _ => {
                            // Judged at the end of the scan: a later Remove
                            // or complete copy makes this harmless.
                            damaged.insert(id, (seg, pos, c.raw_envelope.to_vec()));
                            index.remove(id);
                        }
                    }
                }
                Kind::Update => {
                    if let Some(id) = record::payload_id(payload) {
                        let id = MessageId::from_u64(id);
                        match (
                            index.messages.get_mut(&id),
                            record::decode_update(&payload[8..], format),
                        ) {
                            (Some(e), Some(delivery)) => e.delivery = delivery,
                            (Some(_), None) => {
                                warn!(id = %id, "undecodable delivery record update ignored")
                            }
                            // An update for a message whose segment is gone.
                            (None, _) => {}
                        }
                    }
                }
                Kind::Remove => {
                    if let Some(id) = record::payload_id(payload) {
                        let id = MessageId::from_u64(id);
                        damaged.remove(&id);
                        index.remove(id);
                    }
                }
            }
            pos += HEADER_LEN + header.len;
        }
    }
    let mut damaged: Vec<_> = damaged.into_iter().collect();
    damaged.sort_unstable_by_key(|(id, _)| *id);
    for (id, (seg, pos, mut aside)) in damaged {
        // Keep what there is for a human; the message itself cannot be
        // delivered faithfully.
        aside.extend_from_slice(b"\n");
        let saved = save_aside(dir, &format!("{id}.envelope.json"), &aside);
        error!(id = %id, segment = seg, offset = pos, saved = %saved.display(), "queued message has missing or damaged parts; envelope moved aside");
        report.moved_aside += 1;
    }
    report.messages = index.messages.len();
    for seg in &segs {
        index.segments.entry(*seg).or_insert(0);
    }
    Ok(Recovered {
        index,
        last_segment: segs.last().copied().unwrap_or(0),
        last_id,
        report,
    })
}

/// The record at `pos`, if it is complete and its checksums match this
/// segment's salt.
fn valid_record(data: &[u8], pos: usize, seed: u32) -> Option<(Header, &[u8])> {
    let header = Header::parse(data.get(pos..pos + HEADER_LEN)?, seed)?;
    let payload = data.get(pos + HEADER_LEN..pos + HEADER_LEN + header.len)?;
    header.verify(payload).then_some((header, payload))
}

/// The next offset at or after `from` where a valid record starts. Bytes
/// inside message bodies cannot look like one: they would need the salt.
fn resync(data: &[u8], from: usize, seed: u32) -> Option<usize> {
    let mut at = from;
    while at < data.len() {
        let rel = find(&data[at..], MAGIC)?;
        let cand = at + rel;
        if valid_record(data, cand, seed).is_some() {
            return Some(cand);
        }
        at = cand + 1;
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn save_aside(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let aside = dir.join("corrupt");
    let path = aside.join(name);
    // Mail, like the rest of the spool: the owner's alone.
    let r = std::fs::create_dir_all(&aside)
        .and_then(|_| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
        })
        .and_then(|mut f| f.write_all(bytes));
    if let Err(e) = r {
        warn!(path = %path.display(), error = %e, "cannot save a damaged spool record for inspection");
    }
    path
}
