//! Record framing in segment files.
//!
//! ```text
//! magic "ORS1" | kind u8 | 3 reserved | payload length u32 LE | payload crc u32 LE | header crc u32 LE | payload
//! ```
//! Both checksums are CRC-32C seeded with the segment's random salt (see
//! `segment.rs`), so a torn or corrupted record is always detected, and
//! bytes a client put in a message body can never pass for a record of
//! ours: the client does not know the salt. The header checksum lets
//! recovery reject a false start in a few nanoseconds instead of checksumming
//! a whole claimed payload.

use crate::envelope::{DeliveryRecord, Envelope, LegacyEnvelope};

pub(crate) const MAGIC: &[u8; 4] = b"ORS1";
pub(crate) const HEADER_LEN: usize = 20;
/// No valid record is larger; a larger length is corruption.
pub(crate) const MAX_PAYLOAD: usize = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Data = 1,
    Commit = 2,
    Update = 3,
    Remove = 4,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Data),
            2 => Some(Kind::Commit),
            3 => Some(Kind::Update),
            4 => Some(Kind::Remove),
            _ => None,
        }
    }
}

/// Where a piece of a message body lives: `len` bytes at `off` in segment `seg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub seg: u64,
    pub off: u64,
    pub len: u32,
}

pub(crate) const EXTENT_LEN: usize = 8 + 8 + 4;

/// The header of a record whose payload is `parts` (in order),
/// checksummed with the segment's `seed` (the CRC of its salt). The
/// payload itself is not copied: the writer hands it to the kernel as it
/// came (a vectored write).
pub(crate) fn frame(seed: u32, kind: Kind, parts: &[&[u8]]) -> [u8; HEADER_LEN] {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = kind as u8;
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    let pcrc = parts
        .iter()
        .fold(crc32c::crc32c_append(seed, &h[4..12]), |crc, p| {
            crc32c::crc32c_append(crc, p)
        });
    h[12..16].copy_from_slice(&pcrc.to_le_bytes());
    let hcrc = crc32c::crc32c_append(seed, &h[..16]);
    h[16..20].copy_from_slice(&hcrc.to_le_bytes());
    h
}

/// Append one framed record to `buf`, checksummed with the segment's
/// `seed`; returns the offset of its payload within `buf`.
pub(crate) fn encode(buf: &mut Vec<u8>, seed: u32, kind: Kind, parts: &[&[u8]]) -> usize {
    buf.extend_from_slice(&frame(seed, kind, parts));
    let payload = buf.len();
    for p in parts {
        buf.extend_from_slice(p);
    }
    payload
}

/// A record header read back from disk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub kind: Kind,
    pub len: usize,
    pcrc: u32,
    prefix: [u8; 8],
    seed: u32,
}

impl Header {
    /// Parse and check a header; `None` when it is not one of this
    /// segment's records.
    pub(crate) fn parse(h: &[u8], seed: u32) -> Option<Header> {
        if h.len() < HEADER_LEN || &h[..4] != MAGIC {
            return None;
        }
        let hcrc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
        if crc32c::crc32c_append(seed, &h[..16]) != hcrc {
            return None;
        }
        let kind = Kind::from_u8(h[4])?;
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        if len > MAX_PAYLOAD {
            return None;
        }
        let pcrc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&h[4..12]);
        Some(Header {
            kind,
            len,
            pcrc,
            prefix,
            seed,
        })
    }

    pub(crate) fn verify(&self, payload: &[u8]) -> bool {
        payload.len() == self.len
            && crc32c::crc32c_append(crc32c::crc32c_append(self.seed, &self.prefix), payload)
                == self.pcrc
    }
}

pub(crate) fn id_bytes(id: u64) -> [u8; 8] {
    id.to_le_bytes()
}

/// The message id at the start of every payload.
pub(crate) fn payload_id(p: &[u8]) -> Option<u64> {
    p.get(..8).map(|b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    })
}

/// How the payloads of a segment's records are laid out (from the
/// segment's header, see `segment.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Releases before the envelope/delivery split: `Commit` and `Update`
    /// carry the whole envelope JSON, delivery state included.
    V1,
    /// The envelope JSON once, in the `Commit`; the opaque delivery record
    /// in `Commit` and `Update`.
    V2,
}

/// Encode the fixed part of a commit payload (everything before the tail),
/// in the current format:
/// `id | envelope length u32 | envelope JSON | record format u16 | record length u32 | record | extent count u32 | extents`.
pub(crate) fn commit_head(
    id: u64,
    env: &[u8],
    delivery: &DeliveryRecord,
    extents: &[Extent],
) -> Vec<u8> {
    let mut v = Vec::with_capacity(
        8 + 4 + env.len() + 6 + delivery.data.len() + 4 + extents.len() * EXTENT_LEN,
    );
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&(env.len() as u32).to_le_bytes());
    v.extend_from_slice(env);
    v.extend_from_slice(&delivery.format.to_le_bytes());
    v.extend_from_slice(&(delivery.data.len() as u32).to_le_bytes());
    v.extend_from_slice(&delivery.data);
    v.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    for e in extents {
        v.extend_from_slice(&e.seg.to_le_bytes());
        v.extend_from_slice(&e.off.to_le_bytes());
        v.extend_from_slice(&e.len.to_le_bytes());
    }
    v
}

/// An update payload in the current format: `id | record format u16 | record`.
pub(crate) fn update_payload(id: u64, delivery: &DeliveryRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 2 + delivery.data.len());
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&delivery.format.to_le_bytes());
    v.extend_from_slice(&delivery.data);
    v
}

/// A decoded commit payload.
pub(crate) struct Commit<'a> {
    pub id: u64,
    /// The envelope's bytes, as stored (for a human when the commit is
    /// unusable).
    pub raw_envelope: &'a [u8],
    /// `None` when the envelope does not decode.
    pub stored: Option<(Envelope, DeliveryRecord)>,
    pub extents: Vec<Extent>,
    /// Offset of the tail within the payload.
    pub tail_off: usize,
    pub tail_len: usize,
}

fn take<'a>(p: &'a [u8], pos: &mut usize, n: usize) -> Option<&'a [u8]> {
    let end = pos.checked_add(n)?;
    let s = p.get(*pos..end)?;
    *pos = end;
    Some(s)
}

fn take_u32(p: &[u8], pos: &mut usize) -> Option<usize> {
    Some(u32::from_le_bytes(take(p, pos, 4)?.try_into().ok()?) as usize)
}

fn take_u16(p: &[u8], pos: &mut usize) -> Option<u16> {
    Some(u16::from_le_bytes(take(p, pos, 2)?.try_into().ok()?))
}

pub(crate) fn decode_commit(p: &[u8], format: Format) -> Option<Commit<'_>> {
    let id = payload_id(p)?;
    let mut pos = 8;
    let env_len = take_u32(p, &mut pos)?;
    let raw_envelope = take(p, &mut pos, env_len)?;
    let stored = match format {
        Format::V1 => decode_legacy(raw_envelope),
        Format::V2 => {
            let rec_format = take_u16(p, &mut pos)?;
            let rec_len = take_u32(p, &mut pos)?;
            let data = take(p, &mut pos, rec_len)?.to_vec();
            decode_envelope(raw_envelope).map(|e| (e, DeliveryRecord::new(rec_format, data)))
        }
    };
    let n = take_u32(p, &mut pos)?;
    let mut extents = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let e = take(p, &mut pos, EXTENT_LEN)?;
        extents.push(Extent {
            seg: u64::from_le_bytes(e[0..8].try_into().ok()?),
            off: u64::from_le_bytes(e[8..16].try_into().ok()?),
            len: u32::from_le_bytes(e[16..20].try_into().ok()?),
        });
    }
    Some(Commit {
        id,
        raw_envelope,
        stored,
        extents,
        tail_off: pos,
        tail_len: p.len() - pos,
    })
}

/// The delivery record of an update payload (after the id).
pub(crate) fn decode_update(rest: &[u8], format: Format) -> Option<DeliveryRecord> {
    match format {
        // The whole envelope JSON of that release: the delivery side reads
        // its fields; it must at least be an envelope.
        Format::V1 => decode_legacy(rest).map(|(_, d)| d),
        Format::V2 => {
            let mut pos = 0;
            let rec_format = take_u16(rest, &mut pos)?;
            Some(DeliveryRecord::new(rec_format, rest[pos..].to_vec()))
        }
    }
}

fn decode_legacy(json: &[u8]) -> Option<(Envelope, DeliveryRecord)> {
    let legacy: LegacyEnvelope = serde_json::from_slice(json).ok()?;
    Some((
        legacy.into(),
        DeliveryRecord::new(DeliveryRecord::LEGACY, json.to_vec()),
    ))
}

pub(crate) fn encode_envelope(env: &Envelope) -> Vec<u8> {
    // Serialising plain data structures to JSON cannot fail.
    serde_json::to_vec(env).unwrap_or_default()
}

fn decode_envelope(b: &[u8]) -> Option<Envelope> {
    serde_json::from_slice(b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_detect_damage() {
        let mut buf = Vec::new();
        let head = commit_head(
            7,
            b"{}",
            &DeliveryRecord::new(9, b"rec".to_vec()),
            &[Extent {
                seg: 1,
                off: 2,
                len: 3,
            }],
        );
        let seed = crc32c::crc32c(b"0123456789abcdef");
        let p = encode(&mut buf, seed, Kind::Commit, &[&head, b"tail"]);
        assert_eq!(p, HEADER_LEN);
        assert!(
            Header::parse(&buf[..HEADER_LEN], seed ^ 1).is_none(),
            "another segment's salt"
        );
        let h = Header::parse(&buf[..HEADER_LEN], seed).unwrap();
        assert_eq!(h.kind, Kind::Commit);
        assert!(h.verify(&buf[HEADER_LEN..]));
        let c = decode_commit(&buf[HEADER_LEN..], Format::V2).unwrap();
        assert_eq!(c.id, 7);
        assert_eq!(c.raw_envelope, b"{}");
        assert!(c.stored.is_none(), "{{}} is no envelope");
        assert_eq!(c.extents.len(), 1);
        assert_eq!(&buf[HEADER_LEN + c.tail_off..], b"tail");
        for i in HEADER_LEN..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(!h.verify(&bad[HEADER_LEN..]), "flip at {i} detected");
        }
    }
}
