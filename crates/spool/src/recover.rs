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

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{error, info, warn};

use crate::MessageId;
use crate::error::SpoolError;
use crate::index::{Entry, Index};
use crate::record::{self, Extent, HEADER_LEN, Header, Kind, MAGIC};
use crate::segment::{self, Name};

/// What recovery found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Committed messages found again.
    pub messages: usize,
    /// Segment files read.
    pub segments: usize,
    /// Bytes of unacknowledged, torn tail dropped.
    pub torn_bytes: u64,
    /// Damaged regions, segments or messages kept in `corrupt/`.
    pub moved_aside: usize,
    /// Stray temporary files removed.
    pub temporaries_removed: usize,
    /// Acknowledged messages found lost (a segment shorter than it was
    /// sealed at, emptied or unreadable while newer ones exist, or a
    /// message with damaged parts). Every loss is logged at ERROR.
    pub lost: usize,
    /// Ids of lost messages that are known (from their damaged parts, or
    /// from records about them in other segments); may be fewer than
    /// [`lost`](Self::lost).
    pub lost_ids: Vec<MessageId>,
    /// Segments found damaged in a way that lost acknowledged records
    /// (each logged at ERROR and kept in `corrupt/`); for an emptied or
    /// unreadable one how many messages it held cannot be known.
    pub damaged_segments: usize,
    /// Entries of the spool directory that are not ours (`seg-*` names we
    /// never write, directories), set aside in `corrupt/`.
    pub strays: usize,
}

pub(crate) struct Recovered {
    pub index: Index,
    pub last_segment: u64,
    pub last_id: u64,
    pub report: Recovery,
}

fn read_err(path: PathBuf) -> impl FnOnce(io::Error) -> SpoolError {
    move |e| SpoolError::Open {
        path,
        source: Arc::new(e),
    }
}

/// A message whose commit cannot be used: what is kept of it for a human.
struct Damaged {
    seg: u64,
    pos: usize,
    envelope: Vec<u8>,
    /// Its body pieces in order (the tail last), each with whether a valid
    /// record holds it.
    pieces: Vec<(Extent, bool)>,
}

/// Evidence of a damaged segment: a hard link in `corrupt/` (free, and the
/// file is never written again), else a copy. The original stays where it
/// is, so the records that could be read from it (removals above all) keep
/// working until the writer reclaims it in order.
/// With `copy` the evidence is a copy (the original's seal is rewritten
/// afterwards), falling back to a link when there is no room for one.
fn keep_segment(dir: &Path, seg: u64, why: &str, copy: bool) -> PathBuf {
    let src = segment::path(dir, seg);
    let aside = dir.join("corrupt");
    let dst = aside.join(format!("seg-{seg:016x}.{why}"));
    let link = || std::fs::hard_link(&src, &dst);
    let copy_it = || {
        std::fs::copy(&src, &dst).map(|_| ()).inspect_err(|_| {
            let _ = std::fs::remove_file(&dst);
        })
    };
    let r = ensure_aside(&aside).and_then(|()| {
        let _ = std::fs::remove_file(&dst);
        if copy {
            copy_it().or_else(|_| link())
        } else {
            link().or_else(|_| copy_it())
        }
    });
    if let Err(e) = r {
        warn!(file = %src.display(), to = %dst.display(), error = %e, "cannot keep a damaged spool segment for inspection");
    }
    dst
}

fn ensure_aside(aside: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(aside)
}

/// Move a directory entry that is not one of our segments into `corrupt/`.
fn set_aside(dir: &Path, name: &str, what: &str) -> Result<(), SpoolError> {
    let from = dir.join(name);
    let aside = dir.join("corrupt");
    let mut to = aside.join(format!("stray-{name}"));
    let mut n = 1;
    while to.symlink_metadata().is_ok() {
        to = aside.join(format!("stray-{name}.{n}"));
        n += 1;
    }
    ensure_aside(&aside)
        .and_then(|()| std::fs::rename(&from, &to))
        .map_err(read_err(from.clone()))?;
    warn!(file = %from.display(), moved_to = %to.display(), "{what} in the spool directory set aside: not one of the spool's segments, never read");
    Ok(())
}

pub(crate) fn recover(dir: &Path) -> Result<Recovered, SpoolError> {
    let mut segs = Vec::new();
    let mut report = Recovery::default();
    for entry in std::fs::read_dir(dir).map_err(read_err(dir.to_path_buf()))? {
        let entry = entry.map_err(read_err(dir.to_path_buf()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy().into_owned();
        let is_file = entry.file_type().map_err(read_err(entry.path()))?.is_file();
        match segment::parse_name(&name) {
            Name::Segment(no) if is_file => segs.push(no),
            Name::Segment(_) => {
                set_aside(
                    dir,
                    &name,
                    "something that is not a file under a segment's name",
                )?;
                report.strays += 1;
            }
            Name::Stray => {
                set_aside(
                    dir,
                    &name,
                    "a name like a segment's that the spool never writes (out of range or malformed)",
                )?;
                report.strays += 1;
            }
            Name::Other if is_file && name.ends_with(".tmp") => {
                // Nothing in this layout is written through temporaries, but
                // an older layout or a tool may have left one: it was never
                // acknowledged.
                std::fs::remove_file(entry.path()).map_err(read_err(entry.path()))?;
                report.temporaries_removed += 1;
            }
            Name::Other => {}
        }
    }
    segs.sort_unstable();

    let mut index = Index::default();
    // (segment, payload offset after the id) -> (message id, length)
    let mut chunks: HashMap<(u64, u64), (u64, u32)> = HashMap::new();
    let mut last_id = 0u64;
    // Commits that cannot be used, unless a later record ends the message.
    let mut damaged: HashMap<MessageId, Damaged> = HashMap::new();
    // Ids with records after their commit was lost, and ids removed.
    let mut updated_unknown: BTreeSet<MessageId> = BTreeSet::new();
    let mut removed: BTreeSet<MessageId> = BTreeSet::new();
    // Segments that lost acknowledged records, with how many commits
    // (`None`: cannot be known).
    let mut losses: Vec<(u64, Option<usize>, PathBuf, String)> = Vec::new();
    // Unsealed segments: where their readable records end. The sync
    // thread seals a segment before it acknowledges anything written after
    // it, so a body piece past that end belongs to a message that was
    // never acknowledged, even when its commit is in a later segment.
    let mut unsynced_from: HashMap<u64, u64> = HashMap::new();

    for (i, &seg) in segs.iter().enumerate() {
        let newest = i + 1 == segs.len();
        index.files.insert(seg);
        report.segments += 1;
        let path = segment::path(dir, seg);
        let data = std::fs::read(&path).map_err(read_err(path.clone()))?;
        let Some(head) = segment::read_header(&data) else {
            let blank = data.iter().all(|&b| b == 0);
            if blank && newest {
                // An empty or zero-filled file that is the newest: created
                // just before a crash, so nothing in it was ever
                // acknowledged.
                continue;
            }
            // Not one of our segments, or its header is damaged, or it was
            // emptied while newer ones exist (a segment's header is synced
            // when the file is created): what it held is lost.
            let saved = keep_segment(dir, seg, "unreadable", false);
            report.moved_aside += 1;
            losses.push((
                seg,
                None,
                saved,
                if blank {
                    format!("{} bytes, none of them a segment header", data.len())
                } else {
                    "no valid segment header".to_string()
                },
            ));
            continue;
        };
        let (seed, format) = (head.seed, head.format);
        let mut commits_found = 0u32;
        let mut torn_at = None;
        let mut pos = segment::FILE_HEADER_LEN as usize;
        while pos < data.len() {
            let Some((header, payload)) = valid_record(&data, pos, seed) else {
                match resync(&data, pos + 1, seed) {
                    Some(next) => {
                        let region = &data[pos..next];
                        let saved =
                            save_aside(dir, &format!("seg-{seg:016x}-at-{pos}.bin"), region);
                        error!(
                            file = %path.display(),
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
                        torn_at = Some(pos);
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
                    commits_found += 1;
                    let Some(c) = record::decode_commit(payload, format) else {
                        report.moved_aside += 1;
                        let saved = save_aside(
                            dir,
                            &format!("seg-{seg:016x}-at-{pos}.bin"),
                            &data[pos..pos + HEADER_LEN + payload.len()],
                        );
                        error!(file = %path.display(), offset = pos, saved = %saved.display(), "undecodable commit record moved aside");
                        pos += HEADER_LEN + header.len;
                        continue;
                    };
                    last_id = last_id.max(c.id);
                    let id = MessageId::from_u64(c.id);
                    let found = |e: &Extent| chunks.get(&(e.seg, e.off)) == Some(&(c.id, e.len));
                    let missing = c.extents.iter().any(|e| !found(e));
                    let mut extents = c.extents.clone();
                    if c.tail_len > 0 {
                        extents.push(Extent {
                            seg,
                            off: payload_off + c.tail_off as u64,
                            len: c.tail_len as u32,
                        });
                    }
                    match c.stored {
                        Some((envelope, delivery)) if !missing => {
                            damaged.remove(&id);
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
                            let pieces = extents
                                .iter()
                                .enumerate()
                                .map(|(k, e)| (*e, k >= c.extents.len() || found(e)))
                                .collect();
                            damaged.insert(
                                id,
                                Damaged {
                                    seg,
                                    pos,
                                    envelope: c.raw_envelope.to_vec(),
                                    pieces,
                                },
                            );
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
                                warn!(id = %id, file = %path.display(), "undecodable delivery record update ignored")
                            }
                            // An update for a message whose commit was not
                            // found: lost, unless it was removed after.
                            (None, _) => {
                                updated_unknown.insert(id);
                            }
                        }
                    }
                }
                Kind::Remove => {
                    if let Some(id) = record::payload_id(payload) {
                        let id = MessageId::from_u64(id);
                        damaged.remove(&id);
                        removed.insert(id);
                        index.remove(id);
                    }
                }
            }
            pos += HEADER_LEN + header.len;
        }
        let end = torn_at.unwrap_or(data.len());
        if head.sealed.is_none() {
            unsynced_from.insert(seg, end as u64);
        }
        match head.sealed {
            // Written to its end, synced and sealed: anything short of that
            // lost acknowledged records.
            Some((len, commits)) if (end as u64) < len || commits_found < commits => {
                let saved = keep_segment(dir, seg, "truncated", true);
                // Reported once: the segment's seal now says what it holds
                // (the kept copy has the original seal).
                let resealed = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| {
                        f.set_len(end as u64)?;
                        segment::seal(&f, end as u64, commits_found)
                    });
                if let Err(e) = resealed {
                    warn!(file = %path.display(), error = %e, "cannot record what is left of a damaged spool segment");
                }
                report.moved_aside += 1;
                report.torn_bytes += (data.len() - end) as u64;
                losses.push((
                    seg,
                    Some(commits.saturating_sub(commits_found) as usize),
                    saved,
                    format!(
                        "{} of its {len} sealed bytes readable, {commits_found} of {commits} commits",
                        end
                    ),
                ));
            }
            _ => {
                if torn_at.is_some() {
                    let torn = (data.len() - end) as u64;
                    if data[end..].iter().any(|&b| b != 0) {
                        info!(
                            file = %path.display(),
                            offset = end,
                            bytes = torn,
                            "dropping an unacknowledged partial write at the end of a spool segment"
                        );
                    }
                    report.torn_bytes += torn;
                }
            }
        }
    }
    let mut damaged: Vec<_> = damaged.into_iter().collect();
    damaged.sort_unstable_by_key(|(id, _)| *id);
    let mut lost_ids: BTreeSet<MessageId> = updated_unknown
        .into_iter()
        .filter(|id| !removed.contains(id) && !index.messages.contains_key(id))
        .collect();
    for (id, d) in damaged {
        let mut missing = d.pieces.iter().filter(|(_, ok)| !ok).peekable();
        let never_acknowledged = missing.peek().is_some()
            && missing.all(|(e, _)| unsynced_from.get(&e.seg).is_some_and(|&end| e.off >= end));
        keep_damaged(dir, id, &d, !never_acknowledged);
        report.moved_aside += 1;
        if never_acknowledged {
            lost_ids.remove(&id);
            continue;
        }
        report.lost += 1;
        lost_ids.remove(&id);
        report.lost_ids.push(id);
    }
    for (seg, lost, saved, what) in &losses {
        let ids: Vec<String> = lost_ids.iter().map(|id| id.to_string()).collect();
        let count = lost.map_or_else(|| "an unknown number of".to_string(), |n| n.to_string());
        error!(
            file = %segment::path(dir, *seg).display(),
            kept = %saved.display(),
            lost_messages = %count,
            known_lost_ids = %ids.join(","),
            "spool segment lost acknowledged records ({what}): {count} acknowledged message(s) in it are gone; the segment is kept whole for inspection"
        );
        report.lost += lost.unwrap_or(0);
        report.damaged_segments += 1;
    }
    report.lost_ids.extend(lost_ids);
    report.lost_ids.sort_unstable();
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

/// Keep what there is of a message that cannot be delivered faithfully,
/// for a person to rebuild it: its envelope and every body piece that was
/// found, numbered in order (a missing piece is named in the log; a
/// damaged region holding it is in `corrupt/` too).
///
/// A message whose missing pieces were all in the unsynced tail of a
/// segment (`acknowledged` false) was never acknowledged: the client got
/// no `250` and sends it again. It is kept all the same, with a warning.
fn keep_damaged(dir: &Path, id: MessageId, d: &Damaged, acknowledged: bool) {
    let mut envelope = d.envelope.clone();
    envelope.extend_from_slice(b"\n");
    let saved = save_aside(dir, &format!("{id}.envelope.json"), &envelope);
    let total = d.pieces.len();
    let mut missing = Vec::new();
    let mut kept = 0;
    for (k, (e, ok)) in d.pieces.iter().enumerate() {
        let name = format!("{id}.part-{:04}-of-{total:04}.bin", k + 1);
        if !ok {
            missing.push((k + 1).to_string());
            continue;
        }
        let path = segment::path(dir, e.seg);
        let mut buf = vec![0u8; e.len as usize];
        match std::fs::File::open(&path).and_then(|f| f.read_exact_at(&mut buf, e.off)) {
            Ok(()) => {
                save_aside(dir, &name, &buf);
                kept += 1;
            }
            Err(err) => {
                warn!(file = %path.display(), error = %err, "cannot read a piece of a damaged message");
                missing.push((k + 1).to_string());
            }
        }
    }
    if !acknowledged {
        warn!(
            id = %id,
            file = %segment::path(dir, d.seg).display(),
            offset = d.pos,
            saved = %saved.display(),
            parts_kept = kept,
            parts_missing = %missing.join(","),
            "message whose body was still being synced at a crash was never acknowledged (the client sends it again); what was found is kept in corrupt/ as {id}.*"
        );
        return;
    }
    error!(
        id = %id,
        file = %segment::path(dir, d.seg).display(),
        offset = d.pos,
        saved = %saved.display(),
        parts_kept = kept,
        parts_missing = %missing.join(","),
        "queued message has missing or damaged parts and cannot be delivered: lost; its envelope and the parts found are kept in corrupt/ as {id}.*"
    );
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
    let r = ensure_aside(&aside)
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
